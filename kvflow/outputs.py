"""Plain data passed between the scheduler, the model runner and the user."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvflow.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvflow.structured_output.matcher import RequestGrammar


@dataclass
class ScheduledRequest:
    """One request's share of a step: which tokens to compute and where their KV goes."""

    req_id: str
    token_ids: list[int]  # the tokens computed this step, at positions from num_computed_tokens
    num_computed_tokens: int  # tokens whose KV is already in the cache
    block_ids: list[int]  # the request's whole block table
    sample: bool  # the step reaches the last known token, so a new token is sampled
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far (read by penalties and min_tokens)
    stop_token_ids: frozenset[int]
    # Proposed continuations, computed after token_ids and verified this step (speculative
    # decoding): the step samples at each of their positions and at the last known token.
    draft_token_ids: list[int] = field(default_factory=list)
    grammar: RequestGrammar | None = None  # structured output: masks the sampled rows
    # the request's preemptions when scheduled: a step's results no longer apply to a
    # request preempted (and perhaps scheduled again) while the step was in flight
    num_preemptions: int = 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)  # runner may drop their state
    # Preempted since the last step: state the runner keeps beside their KV (a draft
    # model's cache) is gone with their blocks.
    preempted_req_ids: set[str] = field(default_factory=set)
    num_preemptions: int = 0
    # Counted as computed before its results were back (Scheduler.apply_ahead), its
    # sampled tokens then settle its requests' placeholders.
    applied_ahead: bool = False


@dataclass
class TokenLogprobs:
    """Logprobs at one position: the chosen token first, then the top alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # 1-based rank of each token in the distribution


@dataclass
class RunnerOutput:
    # req_id -> the tokens the step adds to a request that sampled: the draft tokens it
    # accepted, then one sampled token (so one token without drafts)
    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # one per token
    # req_id -> tokens proposed to verify at the request's next step
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # req_id -> (index of the first prompt token scored, one entry per scored token)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # Requests that were to sample but did not: their grammar's masks were not ready (their
    # last token is computed again when they are), or their grammar failed (req_id -> why).
    deferred_req_ids: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Why the engine ended this sample early (finish_reason "abort"): a constraint its
    # output could no longer follow.
    error: str | None = None

    def finished(self) -> bool:
        """A method, as in vLLM (RequestOutput.finished is a field there and here)."""
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """time.monotonic() stamps of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # Prompt tokens found in the prefix cache, not computed (the first sample's, for n > 1;
    # its siblings share its blocks). None until the request is first scheduled.
    num_cached_tokens: int | None = None
