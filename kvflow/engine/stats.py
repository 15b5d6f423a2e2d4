"""What the engine reports about itself, for metrics: a snapshot it replaces whenever its
state changes, and per-step observations a reader drains. Both are safe to read from any
thread, so a server never reaches into the scheduler while the engine thread runs it."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Observations kept for a reader that has not drained them; older ones are dropped.
MAX_PENDING_OBSERVATIONS = 65536


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


@dataclass
class StepObservations:
    """Per-step samples for histograms. deque appends and pops are atomic, so the engine
    thread appends while a reader drains."""

    iteration_tokens: deque[int] = field(
        default_factory=lambda: deque(maxlen=MAX_PENDING_OBSERVATIONS))
    inter_token_latencies: deque[float] = field(
        default_factory=lambda: deque(maxlen=MAX_PENDING_OBSERVATIONS))

    @staticmethod
    def drain(samples: deque) -> list:
        drained = []
        while True:
            try:
                drained.append(samples.popleft())
            except IndexError:
                return drained
