"""What the engine reports about itself, for metrics: a snapshot it replaces whenever its
state changes, and per-step observations a reader drains. Both are safe to read from any
thread, so a server never reaches into the scheduler while the engine thread runs it."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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
