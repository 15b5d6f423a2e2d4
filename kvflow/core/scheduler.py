"""Iteration-level scheduler with a token budget.

There is no prefill or decode phase: each request has `num_computed_tokens` and
`num_tokens`, and each step spends the token budget on running requests first, then
on waiting ones. This one rule gives continuous batching, chunked prefill and decode
mixed in one batch. When the KV pool runs dry, the running request that sorts last
(lowest priority, latest arrival) is preempted: its blocks are freed and it is
recomputed later, keeping the tokens it has generated. Its full blocks stay in the prefix
cache until the pool needs them, so it usually resumes from a cached prefix.

A waiting request is admitted with its longest cached prefix already computed
(KVCacheManager.get_computed_blocks) and spends budget only on the rest.

Under speculative decoding a step may add several tokens to a request: the runner
proposes draft tokens after each step, the scheduler schedules them after the request's
last token at the next step (within the budget and what max_tokens leaves), and the
runner returns the drafts it accepted plus one sampled token. Stops are checked at every
position, so nothing past one is kept, and the rejected drafts' KV slots are simply
written over later (num_computed_tokens counts only accepted positions). A request that
samples holds `num_lookahead_tokens` slots beyond its step, where a draft model writes the
KV of its proposals.

After a failed step, its requests may be isolated: each then runs alone for one step, in
turn, before the others run again, so that a request whose parameters make a step fail
fails by itself (see AsyncEngine) instead of taking the batch it was in with it.

Under the "lpm" policy the waiting queue is reordered at every step by the number of
prompt tokens each request would find cached, plus an age bonus of one block per step
waited: a newcomer's hit is at most max_model_len tokens, so no request waits more than
max_model_len / block_size steps behind newcomers. With more than LPM_MAX_WAITING
requests waiting, the lookups would cost more than they save (SGLang draws the same line)
and the order falls back to arrival.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Collection

from kvflow.config import SchedulerConfig
from kvflow.core.kv_manager import KVCacheManager
from kvflow.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from kvflow.request import Request, RequestStatus

logger = logging.getLogger(__name__)

LPM_MAX_WAITING = 128


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by schedule key
        self.running: list[Request] = []
        self._finished_since_last_step: set[str] = set()
        self._preempted_since_last_step: set[str] = set()
        self._admission_counter = itertools.count()
        self.num_preemptions_total = 0
        self.isolated: list[str] = []  # requests to run alone for a step each, in order

    def _key(self, request: Request) -> tuple:
        return request.schedule_key(self.config.policy)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.admission_order = next(self._admission_counter)
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=self._key)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def isolate(self, request_ids: list[str], first: bool = False) -> None:
        """Run each of these requests alone for its next step, one after another (before
        the requests isolated already, with `first`)."""
        new = [i for i in request_ids if i in self.requests and i not in self.isolated]
        self.isolated = new + self.isolated if first else self.isolated + new

    def _alone(self) -> Request | None:
        """The request that runs alone this step, if any is isolated."""
        while self.isolated and self.isolated[0] not in self.requests:
            self.isolated.pop(0)
        return self.requests[self.isolated[0]] if self.isolated else None

    def schedule(self, in_flight: Collection[str] = (), parts: int = 1,
                 ahead: bool = False) -> SchedulerOutput:
        """The next batch. Under pipeline parallelism several batches are in flight at
        once: the requests of those not yet back (`in_flight`) are left out, and this
        batch takes its share of the running ones when `parts` batches are still to be
        formed (so that the batches in flight stay alike in size) and 1/num_batches of
        the token budget.

        `ahead` (async scheduling): the batch in flight was counted done by
        `apply_ahead`, its requests' next tokens are placeholders, and this batch is formed
        before its results are back. It preempts nothing (the batch in flight writes the
        KV a preemption would free): where a running request does not fit, the batch is
        empty. Nor does it take a request whose placeholder is its last token
        (max_tokens)."""
        budget = self.config.max_num_batched_tokens // self.config.num_batches
        chosen: list[tuple[Request, int]] = []
        num_preemptions = 0
        alone = self._alone()

        # Ascending key order makes the preemption victim (the largest key that is not in
        # flight) always one not yet scheduled this step, or the request being scheduled.
        self.running.sort(key=self._key)
        free = [r for r in self.running if r.request_id not in in_flight]
        share = -(-len(free) // parts)
        for request in free:
            if budget == 0 or share == 0:
                break
            if request.status != RequestStatus.RUNNING or alone not in (None, request):
                continue  # preempted earlier in this loop, or another runs alone
            if request.grammar is not None and request.grammar.awaiting_mask:
                continue  # it waits for its next mask, holding its KV; the others go on
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if ahead and (num_new == 0 or (request.has_placeholder
                                           and request.num_output_tokens >= request.max_tokens)):
                continue  # a prompt that asked for no token, or a request at its last one
            drafts = self._drafts(request, num_new, budget - num_new)
            lookahead = self._lookahead(request, request.num_computed_tokens + num_new,
                                        len(drafts))
            fits = self.kv.allocate_slots(request, num_new,
                                          num_lookahead_tokens=len(drafts) + lookahead)
            if ahead and not fits:
                # Nothing is preempted under a batch in flight: no batch is formed ahead,
                # and the next is formed once this one is back, preempting as it must.
                # (Blocks allocated above stay with their requests for that batch.)
                return SchedulerOutput(scheduled=[], num_batched_tokens=0)
            while not fits:
                victim = self._victim(in_flight)
                self._preempt(victim)
                num_preemptions += 1
                if victim is request:
                    break
                fits = self.kv.allocate_slots(request, num_new,
                                              num_lookahead_tokens=len(drafts) + lookahead)
            else:
                chosen.append((request, num_new, drafts))
                budget -= num_new + len(drafts)
                share -= 1

        if self.config.policy == "lpm":
            self._order_by_longest_prefix()
        while ((not num_preemptions or alone is not None) and self.waiting and budget > 0):
            request = self.waiting[0] if alone is None else alone
            if request.status == RequestStatus.RUNNING or request.request_id in in_flight:
                break  # scheduled above, alone; or recomputed while a batch held it
            cached_ids, num_cached = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_cached, budget)
            lookahead = self._lookahead(request, num_cached + num_new, 0)
            if not (len(self.running) < self.config.max_num_seqs and self.kv.allocate_slots(
                    request, num_new, cached_ids, num_lookahead_tokens=lookahead)):
                victim = self._victim(in_flight)
                if alone is None or victim is None or ahead:
                    break
                # What runs alone must run: the others make room, as a preemption would.
                self._preempt(victim)
                num_preemptions += 1
                continue
            self.waiting.remove(request)
            self.kv.record_admission(request, num_cached)  # before num_cached_tokens is set
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = num_cached
            self.running.append(request)
            chosen.append((request, num_new, []))
            budget -= num_new
        if self.config.policy == "lpm":
            for request in self.waiting:
                request.num_waiting_steps += 1

        finished, self._finished_since_last_step = self._finished_since_last_step, set()
        preempted, self._preempted_since_last_step = self._preempted_since_last_step, set()
        self.num_preemptions_total += num_preemptions
        return SchedulerOutput(
            scheduled=[self._describe(request, num_new, drafts)
                       for request, num_new, drafts in chosen],
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            finished_req_ids=finished,
            preempted_req_ids=preempted,
            num_preemptions=num_preemptions,
        )

    def _victim(self, in_flight: Collection[str]) -> Request | None:
        """The running request to preempt: the one that sorts last, of those whose KV no
        batch in flight is writing."""
        for request in reversed(self.running):
            if request.request_id not in in_flight:
                return request
        return None

    @staticmethod
    def _drafts(request: Request, num_new: int, budget: int) -> list[int]:
        """The proposals to verify this step: only when the step reaches the request's last
        token, and no more than the budget and max_tokens leave room for (a step adds the
        accepted drafts plus one token)."""
        if not request.spec_token_ids or request.num_computed_tokens + num_new < request.num_tokens:
            return []
        room = request.max_tokens - request.num_output_tokens - 1
        return request.spec_token_ids[:max(0, min(room, budget))]

    def _lookahead(self, request: Request, end: int, num_drafts: int) -> int:
        """Slots a request whose step ends at `end` (reaching its last token, so that it
        samples) holds past the step, for the KV of the next step's proposals; never past
        the last position the request can reach."""
        if not self.config.num_lookahead_tokens or end < request.num_tokens:
            return 0
        return max(0, min(self.config.num_lookahead_tokens,
                          request.max_num_tokens - end - num_drafts))

    def _order_by_longest_prefix(self) -> None:
        if len(self.waiting) > LPM_MAX_WAITING:
            self.waiting.sort(key=self._key)
            return
        block_size = self.kv.block_size

        def key(request: Request) -> tuple:
            _, num_cached = self.kv.get_computed_blocks(request)
            return (-(num_cached + request.num_waiting_steps * block_size),
                    *self._key(request))

        self.waiting.sort(key=key)

    @staticmethod
    def _describe(request: Request, num_new: int, drafts: list[int]) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            req_id=request.request_id,
            token_ids=request.all_token_ids[start:start + num_new],
            num_computed_tokens=start,
            block_ids=request.block_ids,
            sample=start + num_new == request.num_tokens,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            stop_token_ids=request.stop_token_ids,
            draft_token_ids=drafts,
            grammar=request.grammar,
            num_preemptions=request.num_preemptions,
        )

    def apply_ahead(self, scheduler_output: SchedulerOutput) -> None:
        """Async scheduling: the batch just submitted counts as computed before its results
        are back, each request that samples holding a placeholder for its token, so that
        the next batch can be formed while this one runs. update_from_output(ahead=True)
        puts the sampled tokens in the placeholders' place."""
        scheduler_output.applied_ahead = True
        for scheduled in scheduler_output.scheduled:
            request = self.requests.get(scheduled.req_id)
            if (request is None or request.status != RequestStatus.RUNNING
                    or request.num_preemptions != scheduled.num_preemptions):
                continue
            request.num_computed_tokens += len(scheduled.token_ids)
            if scheduled.sample and request.max_tokens > 0:
                request.append_placeholder()

    def _preempt(self, request: Request) -> None:
        request.drop_placeholder()  # recomputed from its known tokens, it samples it again
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        self._preempted_since_last_step.add(request.request_id)
        request.num_preemptions += 1
        bisect.insort(self.waiting, request, key=self._key)
        logger.debug("preempted %s after %d output tokens", request.request_id,
                     request.num_output_tokens)

    def recompute_after_failure(self, scheduler_output: SchedulerOutput | None) -> list[str]:
        """A step failed: the KV it was to write may be missing, so the requests it held
        (every running one, if scheduling itself failed) go back to waiting, to be computed
        again from their tokens. Returns their ids."""
        if scheduler_output is None:
            requests = list(self.running)
        else:
            requests = [self.requests[s.req_id] for s in scheduler_output.scheduled
                        if s.req_id in self.requests]
        requests = [r for r in requests if r.status == RequestStatus.RUNNING]
        for request in requests:
            self._preempt(request)
        return [r.request_id for r in requests]

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: RunnerOutput) -> list[tuple[Request, int]]:
        """Apply a step's results; returns the requests that got new tokens, each with how
        many (the tokens are the last of its output_token_ids). A step applied ahead has
        its requests' tokens counted already, and its sampled ones settle placeholders."""
        updated = []
        ahead = scheduler_output.applied_ahead
        if [s.req_id for s in scheduler_output.scheduled] == self.isolated[:1]:
            self.isolated.pop(0)  # it ran alone and the step went through
        for scheduled in scheduler_output.scheduled:
            request = self.requests.get(scheduled.req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            if request.num_preemptions != scheduled.num_preemptions:
                continue  # preempted after this batch was sent (and scheduled again since)
            if not ahead:
                request.num_computed_tokens += len(scheduled.token_ids)
            if not scheduled.sample:
                continue
            if request.max_tokens == 0:  # the prompt was all it asked for
                self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
                updated.append((request, 0))
                continue
            if scheduled.req_id in runner_output.failed:
                self._fail(request, runner_output.failed[scheduled.req_id])
                updated.append((request, 0))
                continue
            if scheduled.req_id in runner_output.deferred_req_ids:
                # Not sampled: its last token is computed again, for logits, once its
                # grammar's mask is ready (its KV is rewritten with the same values).
                request.num_computed_tokens -= 1
                continue
            new_token_ids = runner_output.sampled_token_ids[scheduled.req_id]
            # The accepted drafts' KV was computed this step; the rejected ones' is dropped.
            request.num_computed_tokens += len(new_token_ids) - 1
            num_added = 0
            for token_id in new_token_ids:
                if ahead:
                    request.settle_placeholder(token_id)
                else:
                    request.append_output_token(token_id)
                num_added += 1
                status = self._check_stop(request, token_id)
                if request.grammar is not None:
                    status = self._advance_grammar(request, token_id) or status
                if status is not None:
                    self.finish_request(request.request_id, status)
                    break
            else:
                request.spec_token_ids = runner_output.draft_token_ids.get(scheduled.req_id, [])
            updated.append((request, num_added))
        return updated

    @staticmethod
    def _advance_grammar(request: Request, token_id: int) -> RequestStatus | None:
        """A complete grammar stops its request, even short of min_tokens (nothing may
        follow it). A token the grammar refuses aborts it, with an error that says so: the
        output can no longer match. That token was sampled where the grammar allowed
        nothing else the request's allowed_token_ids or bad_words leave, or where the
        matcher gave up (a lexer past llguidance's limits; it then allows only EOS)."""
        if not request.grammar.accept([token_id]):
            request.error = (f"the output could no longer follow the constraint after "
                             f"{request.num_output_tokens - 1} tokens "
                             f"({request.grammar.error})")
            logger.warning("request %s aborted at token %d: %s", request.request_id,
                           token_id, request.error)
            return RequestStatus.FINISHED_ABORTED
        return RequestStatus.FINISHED_STOPPED if request.grammar.is_terminated else None

    def _fail(self, request: Request, error: str) -> None:
        request.error = error
        logger.warning("request %s aborted: %s", request.request_id, error)
        self.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED)

    @staticmethod
    def _check_stop(request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if (token_id in request.stop_token_ids
                and request.num_output_tokens >= params.min_tokens):
            if params.stop_token_ids and token_id in params.stop_token_ids:
                request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        assert status.finished
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif not request.status.finished:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = status
        self._finished_since_last_step.add(request_id)
        return request
