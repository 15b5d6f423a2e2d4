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
