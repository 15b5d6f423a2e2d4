"""Scheduler and KV cache bookkeeping, with no model involved."""
from __future__ import annotations

import itertools

import pytest

from conftest import scheduler_step
from kvflow.config import SchedulerConfig
from kvflow.core.block_pool import BlockPool
from kvflow.core.kv_manager import KVCacheManager
from kvflow.core.scheduler import Scheduler
from kvflow.request import Request, RequestStatus
from kvflow.sampling_params import SamplingParams


_first_tokens = itertools.count(1, 1000)


def _request(rid: str, prompt_len: int, max_tokens: int = 4, arrival: float = 0.0,
             priority: int = 0) -> Request:
    """A request whose prompt shares no prefix with any other's."""
    first = next(_first_tokens)
    return Request(request_id=rid, prompt_token_ids=list(range(first, first + prompt_len)),
                   sampling_params=SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens,
                   stop_token_ids=frozenset(), arrival_time=arrival, priority=priority)


def test_block_pool_refcounts():
    pool = BlockPool(5)
    blocks = pool.allocate(3)
    assert 0 not in blocks and pool.num_free_blocks == 1
    pool.free(blocks)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    with pytest.raises(AssertionError):
        pool.free([blocks[0]])
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_token_budget_chunks_prompts_and_runs_decodes_first():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_model_len=100), kv)
    scheduler.add_request(_request("a", 6, arrival=0))
    scheduler.add_request(_request("b", 12, arrival=1))
    first = scheduler_step(scheduler)
    assert [(s.req_id, len(s.token_ids), s.sample) for s in first.scheduled] == [
        ("a", 6, True), ("b", 4, False)]
    second = scheduler_step(scheduler)
    assert [(s.req_id, s.num_computed_tokens, len(s.token_ids)) for s in second.scheduled] == [
        ("a", 6, 1), ("b", 4, 8)]


def test_preemption_picks_latest_and_resumes_it():
    kv = KVCacheManager(num_blocks=4, block_size=4)  # 3 usable blocks
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=100), kv)
    scheduler.add_request(_request("old", 4, max_tokens=6, arrival=0))
    scheduler.add_request(_request("new", 4, max_tokens=6, arrival=1))
    scheduler_step(scheduler)  # both prefilled: 2 blocks used
    out = scheduler_step(scheduler)  # both need a second block; only one is free
    assert out.num_preemptions == 1
    assert scheduler.requests["new"].status == RequestStatus.PREEMPTED
    assert scheduler.requests["new"].output_token_ids == [7]
    while scheduler.num_unfinished:
        scheduler_step(scheduler)
    assert kv.pool.num_free_blocks == 3


def test_priority_policy_orders_waiting_requests():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    config = SchedulerConfig(max_num_seqs=1, max_model_len=100, policy="priority")
    scheduler = Scheduler(config, kv)
    scheduler.add_request(_request("low", 4, arrival=0, priority=5))
    scheduler.add_request(_request("high", 4, arrival=1, priority=-1))
    assert [s.req_id for s in scheduler_step(scheduler).scheduled] == ["high"]


def test_finish_and_abort_free_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_model_len=100), kv)
    scheduler.add_request(_request("a", 9))
    scheduler.add_request(_request("b", 3))
    scheduler_step(scheduler)
    assert kv.pool.num_free_blocks < 15
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert kv.pool.num_free_blocks == 15 and not scheduler.running
    assert scheduler.schedule().finished_req_ids == {"a", "b"}


def test_invalid_scheduler_config():
    with pytest.raises(ValueError, match="scheduling_policy"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)


def _draft_step(scheduler: Scheduler, accepted: dict[str, list[int]],
                proposals: dict[str, list[int]]):  # noqa: ANN202
    """One step in which each sampling request adds accepted[req] and proposes
    proposals[req] for the next step."""
    from kvflow.outputs import RunnerOutput

    out = scheduler.schedule()
    sampled = {s.req_id: accepted[s.req_id] for s in out.scheduled if s.sample}
    updated = scheduler.update_from_output(out, RunnerOutput(sampled_token_ids=sampled,
                                                             draft_token_ids=proposals))
    return out, updated


def test_drafts_are_scheduled_after_the_last_token_and_rejected_ones_rolled_back():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=100,
                                          num_lookahead_tokens=3), kv)
    request = _request("a", 5, max_tokens=20)
    scheduler.add_request(request)
    out, _ = _draft_step(scheduler, {"a": [50]}, {"a": [51, 52, 53]})
    # The prefill samples and holds 3 lookahead slots: 5 + 3 tokens -> 2 blocks.
    assert out.scheduled[0].draft_token_ids == [] and len(request.block_ids) == 2
    assert request.spec_token_ids == [51, 52, 53] and request.num_computed_tokens == 5

    # Two drafts accepted, the third rejected and replaced by 60.
    out, updated = _draft_step(scheduler, {"a": [51, 52, 60]}, {"a": [61, 62, 63]})
    scheduled = out.scheduled[0]
    assert scheduled.token_ids == [50] and scheduled.draft_token_ids == [51, 52, 53]
    assert out.num_batched_tokens == 4
    assert updated == [(request, 3)] and request.output_token_ids == [50, 51, 52, 60]
    # KV is valid for 50, 51, 52 (positions 5-7), not for the rejected 53.
    assert request.num_computed_tokens == 8 and request.num_tokens == 9
    # The step held 5 computed + 1 + 3 drafts + 3 lookahead = 12 slots: 3 blocks.
    assert len(request.block_ids) == 3
    # Only blocks of the request's own tokens are registered in the prefix cache.
    assert kv._num_registered["a"] == 1


def test_a_stop_inside_an_accepted_run_ends_the_request_there():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=100,
                                          num_lookahead_tokens=4), kv)
    request = Request(request_id="s", prompt_token_ids=[1, 2, 3],
                      sampling_params=SamplingParams(max_tokens=20, min_tokens=2),
                      max_tokens=20, stop_token_ids=frozenset({9}), arrival_time=0.0)
    scheduler.add_request(request)
    _draft_step(scheduler, {"s": [9]}, {"s": [9, 4, 9, 5]})  # 9 before min_tokens: kept
    assert request.output_token_ids == [9] and not request.status.finished
    _, updated = _draft_step(scheduler, {"s": [9, 4, 9, 5, 6]}, {})
    assert updated == [(request, 1)] and request.output_token_ids == [9, 9]
    assert request.status == RequestStatus.FINISHED_STOPPED and kv.pool.usage == 0


def test_drafts_fit_the_budget_and_what_max_tokens_leaves():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=3, max_model_len=100,
                                          num_lookahead_tokens=4), kv)
    request = _request("b", 2, max_tokens=4)
    scheduler.add_request(request)
    _draft_step(scheduler, {"b": [7]}, {"b": [1, 2, 3, 4]})
    out, _ = _draft_step(scheduler, {"b": [1, 8]}, {"b": [1, 2, 3, 4]})
    assert out.scheduled[0].draft_token_ids == [1, 2]  # the budget of 3 allows 2 drafts
    # 3 tokens out of 4: one more step may add only one token, so no draft is scheduled.
    out, _ = _draft_step(scheduler, {"b": [5]}, {})
    assert out.scheduled[0].draft_token_ids == []
    assert request.status == RequestStatus.FINISHED_LENGTH
    # Lookahead never reached past prompt + max_tokens = 6 positions: 2 blocks.
    assert kv.pool.usage == 0


def test_preemption_drops_drafts_and_tells_the_runner():
    kv = KVCacheManager(num_blocks=5, block_size=4)  # 4 usable blocks
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=100,
                                          num_lookahead_tokens=2), kv)
    first, second = _request("x", 4, max_tokens=8), _request("y", 3, max_tokens=8, arrival=1)
    scheduler.add_request(first)
    scheduler.add_request(second)
    _draft_step(scheduler, {"x": [1], "y": [1]}, {"x": [2, 3], "y": [2, 3]})
    assert len(first.block_ids) == len(second.block_ids) == 2  # each with 2 lookahead slots
    # x's drafts and lookahead need a third block: y, the last running, is preempted.
    out, _ = _draft_step(scheduler, {"x": [2, 3, 4]}, {})
    assert "y" in {r.request_id for r in scheduler.waiting} and second.spec_token_ids == []
    assert out.preempted_req_ids == {"y"} and scheduler.schedule().preempted_req_ids == set()


def test_isolated_requests_run_alone_in_turn_then_together():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=100), kv)
    for i, rid in enumerate("abc"):
        scheduler.add_request(_request(rid, 5, max_tokens=8, arrival=i))
    scheduler_step(scheduler)
    failed = scheduler.schedule()  # a step that failed: its requests are recomputed
    assert scheduler.recompute_after_failure(failed) == ["a", "b", "c"]
    scheduler.isolate(["a", "b", "c"])
    scheduler.isolate(["c"], first=True)  # already isolated: keeps its place
    alone = [[s.req_id for s in scheduler_step(scheduler).scheduled] for _ in range(3)]
    assert alone == [["a"], ["b"], ["c"]]
    assert sorted(s.req_id for s in scheduler_step(scheduler).scheduled) == ["a", "b", "c"]


def test_an_isolated_request_makes_room_when_the_pool_is_full():
    kv = KVCacheManager(num_blocks=4, block_size=4)  # 3 usable blocks
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=100,
                                          max_num_seqs=2), kv)
    scheduler.add_request(_request("a", 7, max_tokens=4, arrival=0))
    scheduler.add_request(_request("b", 3, max_tokens=4, arrival=1))
    scheduler_step(scheduler)  # a: 2 blocks, b: 1 block; the pool and the seats are full
    scheduler.add_request(_request("p", 2, max_tokens=1, arrival=2))
    scheduler.isolate(["p"], first=True)
    out = scheduler_step(scheduler)
    assert [s.req_id for s in out.scheduled] == ["p"] and out.num_preemptions == 1
    assert scheduler.requests["b"].status == RequestStatus.PREEMPTED
    while scheduler.requests:
        scheduler_step(scheduler)
    kv.pool.check_integrity()


def _finish(scheduler: Scheduler, out, token: int = 7) -> None:  # noqa: ANN001
    from kvflow.outputs import RunnerOutput

    sampled = {s.req_id: [token] for s in out.scheduled if s.sample}
    scheduler.update_from_output(out, RunnerOutput(sampled_token_ids=sampled))


def test_batches_in_flight_share_the_running_requests_and_the_budget():
    """A two-stage pipeline: each batch takes half the budget and requests no batch in
    flight holds; the decodes split in halves that stay apart."""
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_model_len=100,
                                          num_batches=2), kv)
    for i in range(4):
        scheduler.add_request(_request(str(i), 4, max_tokens=8, arrival=i))
    a = scheduler.schedule((), 2)
    assert [s.req_id for s in a.scheduled] == ["0", "1"]  # 8 tokens: half the budget
    b = scheduler.schedule({"0", "1"}, 1)
    assert [s.req_id for s in b.scheduled] == ["2", "3"]
    _finish(scheduler, a)
    a = scheduler.schedule({"2", "3"}, 1)  # the first half decodes while the second is out
    assert [s.req_id for s in a.scheduled] == ["0", "1"]
    _finish(scheduler, b)
    b = scheduler.schedule({"0", "1"}, 1)
    assert [s.req_id for s in b.scheduled] == ["2", "3"]
    # With nothing in flight and two batches to form, each takes half the running ones.
    _finish(scheduler, a)
    _finish(scheduler, b)
    assert [s.req_id for s in scheduler.schedule((), 2).scheduled] == ["0", "1"]


def test_a_request_in_flight_is_never_preempted_and_stale_results_are_dropped():
    kv = KVCacheManager(num_blocks=4, block_size=4)  # 3 usable blocks
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=100,
                                          num_batches=2), kv)
    scheduler.add_request(_request("old", 4, max_tokens=6, arrival=0))
    scheduler.add_request(_request("new", 4, max_tokens=6, arrival=1))
    first = scheduler.schedule((), 1)
    _finish(scheduler, first)  # both prefilled: 2 blocks used
    held = scheduler.schedule({"old"}, 1)  # "new" needs a block: the victim is not "old"
    assert held.scheduled[0].req_id == "new" and held.num_preemptions == 0
    # "old" needs one too; "new", in flight now, keeps its blocks: "old" gives way itself.
    out = scheduler.schedule({"new"}, 1)
    assert out.scheduled == [] and out.preempted_req_ids == {"old"}
    assert scheduler.requests["new"].status == RequestStatus.RUNNING
    # "new" recomputed (a failed step) while its batch was out, then scheduled again:
    scheduler.recompute_after_failure(held)
    scheduler.finish_request("old", RequestStatus.FINISHED_ABORTED)
    again = scheduler.schedule((), 1)
    assert "new" in [s.req_id for s in again.scheduled]
    _finish(scheduler, held)  # the old batch's results no longer apply
    assert scheduler.requests["new"].output_token_ids == [7]  # the first step's only
