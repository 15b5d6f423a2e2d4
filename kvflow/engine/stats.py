"""What the engine reports about itself, for metrics: a snapshot it replaces whenever its
state changes, and per-step observations a reader drains. Both are safe to read from any
thread, so a server never reaches into the scheduler while the engine thread runs it."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

# Observations kept for a reader that has not drained them; older ones are dropped.
MAX_PENDING_OBSERVATIONS = 65536
# Step records: their reader (the web dashboard) looks at the last seconds only.
MAX_PENDING_STEPS = 4096


@dataclass(frozen=True)
class SpecDecodeStats:
    """Speculative decoding's totals since start, with vLLM's meanings."""

    num_drafts: int = 0  # verifications: one request's drafts in one step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # [i]: drafts accepted at the i-th draft position (0-based)
    num_accepted_tokens_per_pos: tuple[int, ...] = ()

    def plus(self, drafted: list[int], accepted: list[int]) -> SpecDecodeStats:
        """With one step's verifications added: per verification, drafts and accepted."""
        width = max([len(self.num_accepted_tokens_per_pos), *drafted])
        per_pos = list(self.num_accepted_tokens_per_pos) + [0] * (
            width - len(self.num_accepted_tokens_per_pos))
        for count in accepted:
            for position in range(count):
                per_pos[position] += 1
        return SpecDecodeStats(num_drafts=self.num_drafts + len(drafted),
                               num_draft_tokens=self.num_draft_tokens + sum(drafted),
                               num_accepted_tokens=self.num_accepted_tokens + sum(accepted),
                               num_accepted_tokens_per_pos=tuple(per_pos))


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks referenced by requests
    # Totals since start:
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found
    prompt_tokens: int = 0  # prompt positions computed (a recomputed one counts again)
    generation_tokens: int = 0
    num_aborted: int = 0  # requests aborted: clients that left, shutdown, failed requests
    spec_decode: SpecDecodeStats | None = None  # None without speculative decoding

    @staticmethod
    def total(stats: list[EngineStats]) -> EngineStats:
        """Several engine cores' figures added up (the KV cache's use averaged)."""
        if len(stats) <= 1:
            return stats[0] if stats else EngineStats()
        spec = [s.spec_decode for s in stats if s.spec_decode is not None]
        total = EngineStats(
            num_running=sum(s.num_running for s in stats),
            num_waiting=sum(s.num_waiting for s in stats),
            kv_cache_usage=sum(s.kv_cache_usage for s in stats) / len(stats),
            num_preemptions=sum(s.num_preemptions for s in stats),
            prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
            prompt_tokens=sum(s.prompt_tokens for s in stats),
            generation_tokens=sum(s.generation_tokens for s in stats),
            num_aborted=sum(s.num_aborted for s in stats))
        if not spec:
            return total
        width = max(len(s.num_accepted_tokens_per_pos) for s in spec)
        per_pos = tuple(sum(s.num_accepted_tokens_per_pos[i] for s in spec
                            if i < len(s.num_accepted_tokens_per_pos)) for i in range(width))
        return replace(total, spec_decode=SpecDecodeStats(
            num_drafts=sum(s.num_drafts for s in spec),
            num_draft_tokens=sum(s.num_draft_tokens for s in spec),
            num_accepted_tokens=sum(s.num_accepted_tokens for s in spec),
            num_accepted_tokens_per_pos=per_pos))


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step that ran the model, as counts: a reader prices them with a roofline
    (kvflow.bench.roofline.step_cost) without the engine knowing the machine's ceilings."""

    finished_at: float  # time.monotonic()
    seconds: float  # schedule to outputs
    num_tokens: int  # tokens computed, drafts verified included
    num_attended: int  # sum over computed tokens of the positions each attends
    num_context_tokens: int  # KV cache tokens the step's requests read
    num_logits: int  # rows of logits computed (sampled positions)


@dataclass
class StepObservations:
    """Per-step samples for histograms. deque appends and pops are atomic, so the engine
    thread appends while a reader drains."""

    iteration_tokens: deque[int] = field(
        default_factory=lambda: deque(maxlen=MAX_PENDING_OBSERVATIONS))
    inter_token_latencies: deque[float] = field(
        default_factory=lambda: deque(maxlen=MAX_PENDING_OBSERVATIONS))
    steps: deque[StepRecord] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_STEPS))

    @staticmethod
    def drain(samples: deque) -> list:
        drained = []
        while True:
            try:
                drained.append(samples.popleft())
            except IndexError:
                return drained
