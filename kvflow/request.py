"""Scheduler-side request state: plain ints and lists, no tensors."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvflow.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvflow.structured_output.matcher import RequestGrammar

# An output token not known yet (async scheduling): the step in flight is sampling it, and
# the step scheduled after it reads it on the device.
PLACEHOLDER = -1


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Anything above PREEMPTED has finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: sampling_params.max_tokens or what max_model_len leaves
    stop_token_ids: frozenset[int]  # EOS (unless ignore_eos) and the user's stop_token_ids
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None  # requests share cached KV only with equal salts
    admission_order: int = 0  # breaks ties between equal arrival times
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None  # prefix cache hit when first scheduled
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix cache keys of full blocks
    num_waiting_steps: int = 0  # steps passed over while waiting (ages "lpm" scheduling)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    stop_reason: int | str | None = None
    # Why the engine ended the request early (FINISHED_ABORTED), for its client to read.
    error: str | None = None
    grammar: RequestGrammar | None = None  # structured output: advanced by every token
    # Proposed by the last step, to be verified by the next (speculative decoding).
    spec_token_ids: list[int] = field(default_factory=list)
    # Whether the last output token is a PLACEHOLDER (async scheduling).
    has_placeholder: bool = False

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_num_tokens(self) -> int:
        """Prompt plus every token the request may generate: no KV position goes past it."""
        return self.num_prompt_tokens + self.max_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values are known: all but a placeholder."""
        return self.num_tokens - self.has_placeholder

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def append_placeholder(self) -> None:
        assert not self.has_placeholder
        self.append_output_token(PLACEHOLDER)
        self.has_placeholder = True

    def settle_placeholder(self, token_id: int) -> None:
        """The placeholder becomes the token its step sampled."""
        assert self.has_placeholder
        self.output_token_ids[-1] = self.all_token_ids[-1] = token_id
        self.has_placeholder = False

    def drop_placeholder(self) -> None:
        if self.has_placeholder:
            self.output_token_ids.pop()
            self.all_token_ids.pop()
            self.has_placeholder = False

    def schedule_key(self, policy: str) -> tuple:
        """Smaller runs first: (priority, arrival) under "priority", arrival alone otherwise
        ("lpm" reorders by cache hits at each step, from arrival order)."""
        if policy == "priority":
            return (self.priority, self.arrival_time, self.admission_order)
        return (self.arrival_time, self.admission_order)
