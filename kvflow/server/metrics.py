"""Prometheus metrics with vLLM's names under the kvflow: prefix, so dashboards map one to one."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvflow.engine.llm_engine import LLMEngine
from kvflow.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=self.registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.running = gauge("kvflow:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("kvflow:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kvflow:kv_cache_usage_perc",
                              "Fraction of KV cache blocks referenced by requests (0 to 1).")
        self.prompt_tokens = counter("kvflow:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("kvflow:generation_tokens", "Tokens generated.")
        self.preemptions = counter("kvflow:num_preemptions", "Preemptions of running requests.")
        self.prefix_queries = counter("kvflow:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("kvflow:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.")
        self.success = counter("kvflow:request_success", "Finished requests.", ("finished_reason",))
        self.ttft = histogram("kvflow:time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("kvflow:inter_token_latency_seconds", "Time between tokens.")
        self.e2e = histogram("kvflow:e2e_request_latency_seconds", "Arrival to finish.")
        self.queue = histogram("kvflow:request_queue_time_seconds",
                               "Arrival to first scheduled.")
        self._seen = {"preemptions": 0, "queries": 0, "hits": 0}
        # Export every series from the start, at zero, as dashboards expect.
        for metric in (self.running, self.waiting, self.kv_usage, self.prompt_tokens,
                       self.generation_tokens, self.preemptions, self.prefix_queries,
                       self.prefix_hits, self.ttft, self.itl, self.e2e, self.queue):
            metric.labels(model_name)
        for reason in ("stop", "length"):
            self.success.labels(model_name, reason)

    def observe_engine(self, engine: LLMEngine) -> None:
        """Gauges, and the counters the engine keeps, from engine state read when scraped."""
        scheduler = engine.scheduler
        stats = engine.kv_manager.stats
        self.running.labels(self.model_name).set(len(scheduler.running))
        self.waiting.labels(self.model_name).set(len(scheduler.waiting))
        self.kv_usage.labels(self.model_name).set(engine.kv_manager.usage)
        for key, counter, total in (("preemptions", self.preemptions,
                                     scheduler.num_preemptions_total),
                                    ("queries", self.prefix_queries, stats.queries),
                                    ("hits", self.prefix_hits, stats.hits)):
            if total > self._seen[key]:
                counter.labels(self.model_name).inc(total - self._seen[key])
                self._seen[key] = total

    def observe_tokens(self, new_tokens: int, token_gap_s: float | None) -> None:
        self.generation_tokens.labels(self.model_name).inc(new_tokens)
        if token_gap_s is not None:
            self.itl.labels(self.model_name).observe(token_gap_s)

    def observe_finished(self, output: RequestOutput) -> None:
        name = self.model_name
        self.prompt_tokens.labels(name).inc(len(output.prompt_token_ids))
        for completion in output.outputs:
            self.success.labels(name, completion.finish_reason or "abort").inc()
        m = output.metrics
        if m is None:
            return
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(m.first_token_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.labels(name).observe(m.first_scheduled_time - m.arrival_time)
        if m.finished_time is not None:
            self.e2e.labels(name).observe(m.finished_time - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
