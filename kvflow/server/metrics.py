"""Prometheus metrics with vLLM's names, labels and buckets under the kvflow: prefix (or
vllm:, with --metrics-prefix vllm), so that vLLM's dashboards read them unchanged.

Engine-wide series come from the engine's published EngineStats and StepObservations,
read at scrape time; request-level histograms are observed as each request finishes. The
gauges and counters of an engine's own state carry an engine label, as vLLM's: the engine
core's index (0 alone, under data parallelism 0 to N-1), beside the router's decisions.
"""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvflow.engine.client import CoreState
from kvflow.engine.stats import EngineStats, SpecDecodeStats, StepObservations
from kvflow.outputs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
PER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                     5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
METRIC_PREFIXES = ("kvflow", "vllm")


def buckets_1_2_5(largest: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to largest, as vLLM sizes its token-count histograms."""
    buckets, scale = [], 1
    while True:
        for step in (1, 2, 5):
            if step * scale > largest:
                return buckets
            buckets.append(step * scale)
        scale *= 10


class ServerMetrics:
    def __init__(self, model_name: str, prefix: str = "kvflow") -> None:
        if prefix not in METRIC_PREFIXES:
            raise ValueError(f"metrics prefix must be one of {METRIC_PREFIXES}, got {prefix!r}")
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.prefix = prefix
        self._seen: dict[int, CoreState] = {}  # each core as the last scrape saw it
        self._seen_total = EngineStats()
        self.running = self._gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = self._gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = self._gauge("kv_cache_usage_perc",
                                    "KV-cache usage: fraction of blocks referenced by requests.")
        self.prompt_tokens = self._counter("prompt_tokens",
                                           "Prompt tokens computed (counted as computed).")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated.")
        self.preemptions = self._counter("num_preemptions", "Preemptions of running requests.")
        self.prefix_queries = self._counter("prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = self._counter("prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache.")
        self.success = Counter(f"{prefix}:request_success", "Finished requests.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.iteration_tokens = self._histogram("iteration_tokens_total",
                                                "Tokens per engine step.",
                                                ITERATION_TOKEN_BUCKETS)
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token.",
                                    TTFT_BUCKETS)
        self.itl = self._histogram("inter_token_latency_seconds",
                                   "Time between a sample's tokens.", PER_TOKEN_BUCKETS)
        self.tpot = self._histogram("request_time_per_output_token_seconds",
                                    "A request's decode time per output token.",
                                    PER_TOKEN_BUCKETS)
        self.params_n = self._histogram("request_params_n", "The n request parameter.",
                                        PARAMS_N_BUCKETS)
        self.latencies = {
            name: self._histogram(name, doc, REQUEST_LATENCY_BUCKETS) for name, doc in (
                ("e2e_request_latency_seconds", "Arrival to finish."),
                ("request_queue_time_seconds", "Arrival to first scheduled (WAITING)."),
                ("request_inference_time_seconds", "First scheduled to finish (RUNNING)."),
                ("request_prefill_time_seconds", "First scheduled to first token (PREFILL)."),
                ("request_decode_time_seconds", "First token to finish (DECODE)."))}
        self.sizes: dict[str, Histogram] = {}  # built by bind(), which knows max_model_len
        self.spec_decode: dict[str, Counter] = {}  # built by bind() under speculative decoding
        self.routed = Counter(f"{prefix}:router_decisions", "Requests the data-parallel "
                              "router sent to an engine core, by why it chose that core.",
                              ["model_name", "engine", "decision"], registry=self.registry)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(f"{self.prefix}:{name}", doc, ["model_name", "engine"],
                     registry=self.registry)

    def _counter(self, name: str, doc: str, per_engine: bool = True) -> Counter:
        if per_engine:
            return Counter(f"{self.prefix}:{name}", doc, ["model_name", "engine"],
                           registry=self.registry)
        counter = Counter(f"{self.prefix}:{name}", doc, ["model_name"], registry=self.registry)
        counter.labels(self.model_name)
        return counter

    def _engine_series(self) -> list[Gauge | Counter]:
        return [self.running, self.waiting, self.kv_usage, self.prompt_tokens,
                self.generation_tokens, self.preemptions, self.prefix_queries, self.prefix_hits]

    def _histogram(self, name: str, doc: str, buckets: Iterable[float]) -> Histogram:
        histogram = Histogram(f"{self.prefix}:{name}", doc, ["model_name"],
                              buckets=list(buckets), registry=self.registry)
        histogram.labels(self.model_name)
        return histogram

    def bind(self, max_model_len: int, cache_info: dict[str, str],
             num_speculative_tokens: int = 0, num_engines: int = 1) -> None:
        """Series sized by the loaded model, each engine core's series (exported from the
        start, at zero), the cache's configuration as an info gauge (vLLM's
        cache_config_info), and speculative decoding's counters when it is on
        (num_speculative_tokens > 0), every draft position's from the start as vLLM's."""
        for engine in range(num_engines):
            for series in self._engine_series():
                series.labels(self.model_name, str(engine))
        buckets = buckets_1_2_5(max_model_len)
        for name, doc in (("request_prompt_tokens", "Prompt tokens of a request."),
                          ("request_generation_tokens", "Tokens a request generated."),
                          ("request_max_num_generation_tokens",
                           "Most tokens one of a request's samples generated."),
                          ("request_params_max_tokens", "The max_tokens request parameter.")):
            self.sizes[name] = self._histogram(name, doc, buckets)
        info = Gauge(f"{self.prefix}:cache_config_info", "The KV cache's configuration.",
                     sorted(cache_info), registry=self.registry)
        info.labels(**cache_info).set(1)
        if num_speculative_tokens:
            for field, doc in (("num_drafts", "Verifications: one request's drafts in a step."),
                               ("num_draft_tokens", "Draft tokens verified."),
                               ("num_accepted_tokens", "Draft tokens accepted.")):
                self.spec_decode[field] = self._counter(f"spec_decode_{field}", doc,
                                                        per_engine=False)
            self.spec_decode["num_accepted_tokens_per_pos"] = Counter(
                f"{self.prefix}:spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted at each draft position (0-based).",
                ["model_name", "position"], registry=self.registry)
            for position in range(num_speculative_tokens):
                self.spec_decode["num_accepted_tokens_per_pos"].labels(self.model_name,
                                                                       str(position))

    def observe_engine(self, cores: list[CoreState], observations: StepObservations) -> None:
        """At scrape time: each core's gauges from its last snapshot (zero once it has
        stopped), counters by what they grew since the last scrape, and the per-step
        samples gathered since."""
        name = self.model_name
        for core in cores:
            engine, stats = str(core.index), core.stats
            seen = self._seen.get(core.index)
            self.running.labels(name, engine).set(stats.num_running if core.alive else 0)
            self.waiting.labels(name, engine).set(stats.num_waiting if core.alive else 0)
            self.kv_usage.labels(name, engine).set(stats.kv_cache_usage if core.alive else 0)
            for counter, field in ((self.prompt_tokens, "prompt_tokens"),
                                   (self.generation_tokens, "generation_tokens"),
                                   (self.preemptions, "num_preemptions"),
                                   (self.prefix_queries, "prefix_cache_queries"),
                                   (self.prefix_hits, "prefix_cache_hits")):
                grown = getattr(stats, field) - (getattr(seen.stats, field) if seen else 0)
                if grown > 0:
                    counter.labels(name, engine).inc(grown)
            for decision, count in core.routed.items():
                grown = count - (seen.routed.get(decision, 0) if seen else 0)
                if grown > 0:
                    self.routed.labels(name, engine, decision).inc(grown)
            self._seen[core.index] = core
        total = EngineStats.total([core.stats for core in cores])
        self._observe_spec_decode(total)
        self._seen_total = total
        for tokens in StepObservations.drain(observations.iteration_tokens):
            self.iteration_tokens.labels(name).observe(tokens)
        for gap in StepObservations.drain(observations.inter_token_latencies):
            self.itl.labels(name).observe(gap)

    def _observe_spec_decode(self, stats: EngineStats) -> None:
        now, seen = stats.spec_decode, self._seen_total.spec_decode or SpecDecodeStats()
        if now is None or not self.spec_decode:
            return
        for field in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            grown = getattr(now, field) - getattr(seen, field)
            if grown > 0:
                self.spec_decode[field].labels(self.model_name).inc(grown)
        per_pos = self.spec_decode["num_accepted_tokens_per_pos"]
        before = seen.num_accepted_tokens_per_pos
        for position, total in enumerate(now.num_accepted_tokens_per_pos):
            grown = total - (before[position] if position < len(before) else 0)
            if grown > 0:
                per_pos.labels(self.model_name, str(position)).inc(grown)

    def observe_finished(self, output: RequestOutput, n: int, max_tokens: int) -> None:
        name = self.model_name
        for completion in output.outputs:
            self.success.labels(name, completion.finish_reason or "abort").inc()
        generated = [len(c.token_ids) for c in output.outputs]
        self.params_n.labels(name).observe(n)
        if self.sizes:
            self.sizes["request_prompt_tokens"].labels(name).observe(len(output.prompt_token_ids))
            self.sizes["request_generation_tokens"].labels(name).observe(sum(generated))
            self.sizes["request_max_num_generation_tokens"].labels(name).observe(max(generated))
            self.sizes["request_params_max_tokens"].labels(name).observe(max_tokens)
        m = output.metrics
        if m is None or m.finished_time is None:
            return
        latency = self.latencies
        latency["e2e_request_latency_seconds"].labels(name).observe(
            m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            latency["request_queue_time_seconds"].labels(name).observe(
                m.first_scheduled_time - m.arrival_time)
            latency["request_inference_time_seconds"].labels(name).observe(
                m.finished_time - m.first_scheduled_time)
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(m.first_token_time - m.arrival_time)
            decode = m.finished_time - m.first_token_time
            latency["request_decode_time_seconds"].labels(name).observe(decode)
            if m.first_scheduled_time is not None:
                latency["request_prefill_time_seconds"].labels(name).observe(
                    m.first_token_time - m.first_scheduled_time)
            if max(generated) > 1:
                self.tpot.labels(name).observe(decode / (max(generated) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
