"""The web dashboard's figures (GET /dashboard/stats): the engine's state now, and its
rates over the last WINDOW_S seconds, as one small JSON document the page polls.

Counters come from the engine's published EngineStats, sampled at each poll; step times
from the engine's StepRecords, drained here and priced with the roofline of
kvflow.bench.roofline against the ceilings `kvflow env` measured (read from its cache,
never measured by the server). Everything here runs on the event loop.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvflow.bench.hardware import cached_ceilings
from kvflow.bench.roofline import ModelCost, step_cost
from kvflow.engine.client import EngineClient, EngineFacts
from kvflow.engine.stats import EngineStats, StepObservations, StepRecord

WINDOW_S = 5.0  # rates and step figures are over this many seconds
MIN_SPAN_S = 0.2  # a rate over less time than this is noise; polls closer than it share one
NUM_SLOWEST = 5


def serving_cost(facts: EngineFacts) -> ModelCost:
    """The roofline's model cost for the loaded model: its shape from the config, and the
    bytes of the weights it holds (quantized ones at their own size, a tied embedding
    once) rather than the checkpoint's. The shape leaves out biases and extra norms, whose
    FLOPs are a rounding error beside the matmuls'."""
    config = facts.model_config
    shape = {"hidden_size": config.hidden_size, "num_attention_heads": config.num_heads,
             "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
             "num_hidden_layers": config.num_layers, "vocab_size": config.vocab_size,
             "intermediate_size": config.intermediate_size,
             "tie_word_embeddings": config.tie_word_embeddings}
    if config.moe is not None:
        shape.update(num_experts=config.moe.num_experts, num_experts_per_tok=config.moe.top_k,
                     moe_intermediate_size=config.moe.intermediate_size,
                     shared_expert_intermediate_size=config.moe.shared_expert_size,
                     mlp_only_layers=[i for i, sparse in enumerate(config.moe.sparse_layers)
                                      if not sparse])
    dtype_bytes = torch.empty((), dtype=facts.dtype).element_size()
    cost = ModelCost.from_config(shape, dtype_bytes=dtype_bytes)
    return replace(cost, weight_bytes=facts.weight_bytes,
                   expert_bytes=facts.expert_bytes // cost.num_experts if facts.expert_bytes
                   else 0)


@dataclass(frozen=True)
class _Sample:
    time: float
    stats: EngineStats


def _rate(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


class DashboardFeed:
    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.engine = engine
        facts = engine.facts
        self.model_name = model_name
        self.cost = serving_cost(facts)
        self.dtype = str(facts.dtype).removeprefix("torch.")
        self.threads = facts.num_threads
        self.num_cores = len(engine.cores())  # engine cores, each stepping on its own
        self.ceilings = cached_ceilings(facts.device.type)
        self.samples: deque[_Sample] = deque()
        self.steps: deque[StepRecord] = deque()

    def model(self) -> dict[str, Any]:
        facts = self.engine.facts
        return {"name": self.model_name, "max_model_len": facts.max_model_len,
                "dtype": self.dtype, "device": facts.device.type, "threads": self.threads,
                "engine_cores": self.num_cores,
                "weight_bytes": self.cost.weight_bytes,
                "kv_cache_tokens": facts.kv_cache_tokens,
                "block_size": facts.block_size,
                "prefix_caching": facts.prefix_caching,
                "num_speculative_tokens": facts.num_speculative_tokens}

    def snapshot(self, num_in_flight_http: int) -> dict[str, Any]:
        now = time.monotonic()
        stats = self.engine.stats
        self._sample(now, stats)
        base = self.samples[0]
        span = now - base.time
        seen = span >= MIN_SPAN_S

        def per_s(field: str) -> float | None:
            return (getattr(stats, field) - getattr(base.stats, field)) / span if seen else None

        queries = stats.prefix_cache_queries - base.stats.prefix_cache_queries
        hits = stats.prefix_cache_hits - base.stats.prefix_cache_hits
        return {
            "window_s": WINDOW_S,
            "model": self.model(),
            "requests": {"running": stats.num_running, "waiting": stats.num_waiting,
                         "http_in_flight": num_in_flight_http,
                         "aborted_total": stats.num_aborted,
                         "preemptions_total": stats.num_preemptions},
            "kv_cache": {"usage": stats.kv_cache_usage},
            "prefix_cache": {"hit_rate": _rate(hits, queries) if seen else None,
                             "hit_rate_total": _rate(stats.prefix_cache_hits,
                                                     stats.prefix_cache_queries)},
            "tokens_per_s": {"prompt": per_s("prompt_tokens"),
                             "generation": per_s("generation_tokens")},
            "steps": self._steps(now),
            "spec_decode": self._spec_decode(stats, base.stats),
            "slowest": self._slowest(now),
        }

    def _sample(self, now: float, stats: EngineStats) -> None:
        if not self.samples or now - self.samples[-1].time >= MIN_SPAN_S:
            self.samples.append(_Sample(now, stats))
        # Keep one sample at least WINDOW_S old, as the base of the rates.
        while len(self.samples) > 1 and self.samples[1].time <= now - WINDOW_S:
            self.samples.popleft()
        self.steps.extend(StepObservations.drain(self.engine.observations.steps))
        while self.steps and self.steps[0].finished_at < now - WINDOW_S:
            self.steps.popleft()

    def _steps(self, now: float) -> dict[str, Any]:
        steps = self.steps
        seconds = sum(step.seconds for step in steps)
        times_ms = [1000 * step.seconds for step in steps] or [None]
        return {"count": len(steps), "per_s": len(steps) / WINDOW_S,
                "mean_ms": 1000 * seconds / len(steps) if steps else None,
                "max_ms": max(times_ms) if steps else None, "last_ms": times_ms[-1],
                "busy": min(1.0, seconds / (WINDOW_S * self.num_cores)),
                "roofline": self._roofline(seconds)}

    def _roofline(self, seconds: float) -> dict[str, Any]:
        """The steps' time at the ceilings (each step bound by its compute or its memory
        traffic, whichever is slower) over their measured time."""
        ceiling = self.ceilings
        if ceiling is None:
            return {"percent": None,
                    "missing": f"no ceilings measured for {self.threads} thread(s): run "
                               f"`kvflow env --threads {self.threads}` once"}
        # None for a dtype `kvflow env` does not measure (float16 on the CPU): the
        # steps are then held to their memory traffic alone.
        flops_per_s = ceiling["matmul_flops_per_s"].get(self.dtype)
        bandwidth = ceiling["dram_read_bytes_per_s"]
        compute = memory = 0.0
        for step in self.steps:
            cost = step_cost(self.cost, step.num_tokens, step.num_attended,
                             step.num_context_tokens, step.num_logits)
            step_compute = cost.flops / flops_per_s if flops_per_s else 0.0
            step_memory = cost.bytes / bandwidth
            if step_compute >= step_memory:
                compute += step_compute
            else:
                memory += step_memory
        return {"percent": 100 * (compute + memory) / seconds if seconds > 0 else None,
                "binding": None if seconds <= 0 else "compute" if compute >= memory
                else "memory",
                "dram_read_bytes_per_s": bandwidth, "matmul_flops_per_s": flops_per_s,
                "threads": ceiling["threads"], "measured_at": ceiling["measured_at"]}

    @staticmethod
    def _spec_decode(stats: EngineStats, base: EngineStats) -> dict[str, Any] | None:
        now = stats.spec_decode
        if now is None:
            return None
        before = base.spec_decode or now
        drafted = now.num_draft_tokens - before.num_draft_tokens
        accepted = now.num_accepted_tokens - before.num_accepted_tokens
        return {"acceptance_rate": _rate(accepted, drafted),
                "acceptance_rate_total": _rate(now.num_accepted_tokens, now.num_draft_tokens),
                "drafts_total": now.num_drafts}

    def _slowest(self, now: float) -> list[dict[str, Any]]:
        """The requests longest in flight, with how far each has come."""
        oldest = sorted(self.engine.in_flight.values(), key=lambda r: r.arrival_time)
        rows = []
        for record in oldest[:NUM_SLOWEST]:
            first = record.first_token_time
            decoding = now - first if first is not None else 0.0
            rows.append({"id": record.request_id, "age_s": now - record.arrival_time,
                         "state": "before its first token" if first is None else "generating",
                         "prompt_tokens": record.num_prompt_tokens,
                         "generated_tokens": record.num_generated,
                         "ttft_s": None if first is None else first - record.arrival_time,
                         "tokens_per_s": (record.num_generated - 1) / decoding
                         if decoding > 0 and record.num_generated > 1 else None})
        return rows
