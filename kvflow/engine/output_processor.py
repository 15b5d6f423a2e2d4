"""From sampled tokens to user-facing outputs: text, stop strings, logprobs, n samples.

A prompt with n samples becomes n scheduler requests; their outputs gather here under
the parent's request id.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from kvflow.outputs import (CompletionOutput, Logprob, PromptLogprobs, RequestMetrics,
                            RequestOutput, RunnerOutput, SampleLogprobs, TokenLogprobs)
from kvflow.request import Request, RequestStatus
from kvflow.tokenizer.detokenizer import IncrementalDetokenizer


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    child_ids: list[str]
    num_unfinished: int
    metrics: RequestMetrics
    num_cached_tokens: int | None = None


@dataclass
class SampleState:
    parent: ParentState
    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: SampleLogprobs | None
    cumulative_logprob: float | None = None
    token_ids: list[int] = field(default_factory=list)
    last_token_time: float | None = None


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase,
                 inter_token_latencies: deque[float] | None = None) -> None:
        self.tokenizer = tokenizer
        # Where the time between a sample's tokens goes, for metrics (None: not recorded).
        self.inter_token_latencies = inter_token_latencies
        self.samples: dict[str, SampleState] = {}  # scheduler request id -> state
        self.parents: dict[str, ParentState] = {}

    def add(self, parent: ParentState, children: list[Request]) -> None:
        self.parents[parent.request_id] = parent
        for index, child in enumerate(children):
            params = child.sampling_params
            self.samples[child.request_id] = SampleState(
                parent=parent, index=index,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer, child.prompt_token_ids, params.skip_special_tokens,
                    params.stop_strings, params.include_stop_str_in_output),
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )

    def drop(self, parent_id: str) -> None:
        parent = self.parents.pop(parent_id, None)
        for child_id in parent.child_ids if parent else ():
            del self.samples[child_id]

    def process(self, runner_output: RunnerOutput, updated: list[tuple[Request, int]]
                ) -> tuple[list[RequestOutput], list[str]]:
        """updated: the requests that got new tokens, each with how many (the last of its
        output_token_ids). -> (outputs of parents that changed, child ids that hit a stop
        string)."""
        for req_id, (first, entries) in runner_output.prompt_logprobs.items():
            self._record_prompt_logprobs(self.samples[req_id].parent, first, entries)
        changed: dict[str, ParentState] = {}
        stopped: list[str] = []
        now = time.monotonic()
        for request, num_new in updated:
            state = self.samples[request.request_id]
            metrics = state.parent.metrics
            if metrics.first_token_time is None:
                metrics.first_scheduled_time = request.first_scheduled_time
                metrics.first_token_time = now
            if state.index == 0:
                state.parent.num_cached_tokens = request.num_cached_tokens
            if state.last_token_time is not None and self.inter_token_latencies is not None:
                self.inter_token_latencies.append(now - state.last_token_time)
            state.last_token_time = now
            stop = self._add_tokens(state, request, num_new,
                                    runner_output.logprobs.get(request.request_id))
            finish_reason = request.status.finish_reason
            if stop is not None:  # the text is cut there, whatever else ended the request
                if not request.status.finished:
                    stopped.append(request.request_id)
                request.stop_reason, finish_reason = stop, "stop"
            self._publish(state, finish_reason, request.stop_reason, request.error)
            changed[state.parent.request_id] = state.parent
        return [self._snapshot(parent) for parent in changed.values()], stopped

    def _add_tokens(self, state: SampleState, request: Request, num_new: int,
                    entries: list[TokenLogprobs] | None) -> str | None:
        """Takes a step's tokens one at a time, as if each came from its own step, up to a
        stop string (the tokens after it are dropped); returns the stop string, if any."""
        params = request.sampling_params
        first = request.num_output_tokens - num_new
        for offset, token_id in enumerate(request.output_token_ids[first:]):
            state.token_ids.append(token_id)
            if entries is not None and state.logprobs is not None:
                state.logprobs.append(self._as_dict(entries[offset]))
                state.cumulative_logprob += entries[offset].logprobs[0]
            if not params.detokenize:
                continue
            # The EOS or stop token that ended the request is not part of the text (as in
            # vLLM), unless include_stop_str_in_output asks for it; the scheduler ends a
            # request at its stop token, so only the last token can be one. A grammar that
            # completes also stops its request, at a token that is text.
            stopped_by_token = (offset == num_new - 1
                                and request.status == RequestStatus.FINISHED_STOPPED
                                and token_id in request.stop_token_ids)
            new_text = [] if stopped_by_token and not params.include_stop_str_in_output \
                else [token_id]
            stop = state.detokenizer.update(
                new_text, check_stop=first + offset + 1 >= params.min_tokens)
            if stop is not None:
                return stop
        return None

    def _publish(self, state: SampleState, finish_reason: str | None,
                 stop_reason: int | str | None, error: str | None) -> None:
        parent = state.parent
        parent.outputs[state.index] = CompletionOutput(
            index=state.index, text=state.detokenizer.text, token_ids=list(state.token_ids),
            cumulative_logprob=state.cumulative_logprob,
            # A copy: the engine thread goes on appending while a server serialises this one.
            logprobs=None if state.logprobs is None else list(state.logprobs),
            finish_reason=finish_reason, stop_reason=stop_reason, error=error)
        if finish_reason is not None:
            parent.num_unfinished -= 1
            if parent.num_unfinished == 0:
                parent.metrics.finished_time = time.monotonic()

    def _snapshot(self, parent: ParentState) -> RequestOutput:
        finished = parent.num_unfinished == 0
        if finished:
            self.drop(parent.request_id)
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids,
                             prompt_logprobs=parent.prompt_logprobs,
                             outputs=list(parent.outputs), finished=finished,
                             metrics=parent.metrics,
                             num_cached_tokens=parent.num_cached_tokens)

    def _record_prompt_logprobs(self, parent: ParentState, first: int,
                                entries: list[TokenLogprobs]) -> None:
        assert parent.prompt_logprobs is not None
        # A recomputed (preempted) or sibling request scores positions already recorded.
        for offset, entry in enumerate(entries):
            if first + offset == len(parent.prompt_logprobs):
                parent.prompt_logprobs.append(self._as_dict(entry))

    def _as_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        result: dict[int, Logprob] = {}
        for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs, entry.ranks):
            if token_id not in result:
                result[token_id] = Logprob(logprob=logprob, rank=rank,
                                           decoded_token=self.tokenizer.decode([token_id]))
        return result
