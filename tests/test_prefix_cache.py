"""The prefix cache: block pool order, lookups and isolation, the lpm policy, and end to end
greedy outputs identical with the cache on and off."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from conftest import scheduler_step
from kvflow import LLM, SamplingParams
from kvflow.config import SchedulerConfig
from kvflow.core.block_pool import BlockPool
from kvflow.core.kv_manager import KVCacheManager
from kvflow.core.scheduler import Scheduler
from kvflow.engine.llm_engine import EngineStepError
from kvflow.outputs import SchedulerOutput
from kvflow.worker.model_runner import StepInFlight
from kvflow.request import Request

BLOCK = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv_heads * head_dim * float32


def _request(rid: str, tokens: list[int], max_tokens: int = 4, arrival: float = 0.0,
             salt: str | None = None, params: SamplingParams | None = None) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(tokens),
                   sampling_params=params or SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens, stop_token_ids=frozenset(), arrival_time=arrival,
                   cache_salt=salt)


# Block pool -----------------------------------------------------------------------------

def test_free_queue_hands_out_uncached_blocks_first_then_least_recently_freed():
    pool = BlockPool(7)
    a = pool.allocate(3)
    b = pool.allocate(3)
    for i, block_id in enumerate(a + b[:2]):
        pool.register(block_id, bytes([i]))
    pool.free(a[::-1])  # a request frees its tail first
    pool.free(b[::-1])  # b[2] caches nothing: it goes to the front
    pool.check_integrity()
    order = pool.allocate(6)
    assert order == [b[2], a[2], a[1], a[0], b[1], b[0]]
    assert pool.num_cached_blocks == 0  # handing a block out evicts its entry


def test_touch_revives_a_cached_block_from_the_middle_of_the_queue():
    pool = BlockPool(5)
    ids = pool.allocate(4)
    for i, block_id in enumerate(ids):
        pool.register(block_id, bytes([i]))
    pool.free(ids)
    assert pool.lookup(bytes([2])) == ids[2]
    pool.touch([ids[2]])
    assert pool.num_free_blocks == 3 and pool.ref_count(ids[2]) == 1
    pool.check_integrity()
    assert pool.allocate(3) == [ids[0], ids[1], ids[3]]
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_a_second_block_with_the_same_prefix_stays_unindexed():
    pool = BlockPool(4)
    first, second = pool.allocate(2)
    pool.register(first, b"x")
    pool.register(second, b"x")
    assert pool.lookup(b"x") == first
    pool.free([first, second])
    assert pool.allocate(1) == [second]  # uncached: reused before the cached one


# KV cache manager ---------------------------------------------------------------------

def test_lookup_returns_full_blocks_only_and_never_the_last_token():
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK)
    owner = _request("owner", range(100, 114))  # 3 full blocks and 2 tokens
    assert kv.allocate_slots(owner, 14)
    assert kv.pool.num_cached_blocks == 3
    # 12 tokens equal to the owner's: the last one must still be computed.
    same = _request("same", range(100, 112))
    ids, num_cached = kv.get_computed_blocks(same)
    assert (ids, num_cached) == (owner.block_ids[:2], 8)
    # Diverging inside the third block: only the first two blocks match.
    diverging = _request("div", [*range(100, 110), 999, 998, 997, 996, 995])
    assert kv.get_computed_blocks(diverging) == (owner.block_ids[:2], 8)
    # A prompt shorter than one block finds nothing, and the partial block is never shared.
    assert kv.get_computed_blocks(_request("short", range(100, 103))) == ([], 0)
    longer = _request("longer", range(100, 120))
    ids, num_cached = kv.get_computed_blocks(longer)
    assert num_cached == 12 and owner.block_ids[3] not in ids


def test_cache_salt_and_prompt_logprobs_isolate():
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK)
    salted = _request("a", range(50, 70), salt="tenant-a")
    assert kv.allocate_slots(salted, 20)
    assert kv.get_computed_blocks(_request("b", range(50, 70), salt="tenant-b")) == ([], 0)
    assert kv.get_computed_blocks(_request("none", range(50, 70))) == ([], 0)
    assert kv.get_computed_blocks(_request("a2", range(50, 70), salt="tenant-a"))[1] == 16
    scored = _request("p", range(50, 70), salt="tenant-a",
                      params=SamplingParams(max_tokens=4, prompt_logprobs=1))
    assert kv.get_computed_blocks(scored) == ([], 0)


def test_identity_is_part_of_the_key():
    tokens = range(10, 30)
    one = KVCacheManager(num_blocks=32, block_size=BLOCK, cache_identity="model-a")
    other = KVCacheManager(num_blocks=32, block_size=BLOCK, cache_identity="model-b")
    r1, r2 = _request("1", tokens), _request("2", tokens)
    one.get_computed_blocks(r1)
    other.get_computed_blocks(r2)
    assert not set(r1.block_hashes) & set(r2.block_hashes)


def test_disabled_cache_registers_nothing():
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK, enable_caching=False)
    request = _request("a", range(20))
    assert kv.allocate_slots(request, 20)
    assert kv.pool.num_cached_blocks == 0
    assert kv.get_computed_blocks(_request("b", range(20))) == ([], 0)


# Scheduler ------------------------------------------------------------------------------

def test_admission_skips_cached_tokens_and_siblings_share_in_one_step():
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    scheduler = Scheduler(SchedulerConfig(max_model_len=100), kv)
    prompt = list(range(200, 221))  # 5 full blocks and 1 token
    for i in range(3):
        scheduler.add_request(_request(f"{i}_n", prompt))
    first = scheduler_step(scheduler)
    assert [(s.num_computed_tokens, len(s.token_ids)) for s in first.scheduled] == [
        (0, 21), (20, 1), (20, 1)]
    shared = first.scheduled[0].block_ids[:5]
    assert all(s.block_ids[:5] == shared for s in first.scheduled)
    assert all(kv.pool.ref_count(b) == 3 for b in shared)
    assert [scheduler.requests[f"{i}_n"].num_cached_tokens for i in range(3)] == [0, 20, 20]
    assert (kv.stats.queries, kv.stats.hits) == (63, 40)
    while scheduler.num_unfinished:
        scheduler_step(scheduler)
    kv.pool.check_integrity()
    assert kv.pool.num_free_blocks == kv.pool.num_usable_blocks
    assert kv.pool.num_cached_blocks > 5  # prompt and generated blocks stay cached


def test_preempted_request_resumes_from_its_cached_prefix():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)  # 7 usable blocks
    scheduler = Scheduler(SchedulerConfig(max_model_len=100), kv)
    scheduler.add_request(_request("old", range(300, 312), max_tokens=8, arrival=0))
    scheduler.add_request(_request("new", range(400, 412), max_tokens=8, arrival=1))
    scheduler_step(scheduler)  # 3 blocks each
    preempted_at = None
    for _ in range(8):
        out = scheduler_step(scheduler)
        if out.num_preemptions:
            preempted_at = out
            break
    assert preempted_at is not None
    victim = scheduler.requests["new"]
    resumed = None
    while resumed is None and scheduler.num_unfinished:
        out = scheduler_step(scheduler)
        resumed = next((s for s in out.scheduled if s.req_id == "new"), None)
    # "old" grew into the victim's partial block, then into its cached tail block (leaves
    # go first), and "new" resumes from the two blocks still cached.
    assert resumed is not None and resumed.num_computed_tokens == 8
    assert victim.num_cached_tokens == 0  # reported from the first admission only
    # Resuming from its own blocks is not a prompt served from the cache.
    assert (kv.stats.queries, kv.stats.hits) == (24, 0)


def test_lpm_runs_longest_cached_prefix_first_and_ages_the_rest():
    kv = KVCacheManager(num_blocks=256, block_size=BLOCK)
    config = SchedulerConfig(max_num_seqs=1, max_model_len=200, policy="lpm")
    scheduler = Scheduler(config, kv)
    system = list(range(500, 540))  # 10 blocks
    scheduler.add_request(_request("warm", system + [1], max_tokens=1))
    scheduler_step(scheduler)
    scheduler.add_request(_request("cold", range(600, 620), max_tokens=1, arrival=1.0))
    order = []
    for i in range(40):
        # A newcomer that hits the cached system prompt arrives at every step.
        scheduler.add_request(_request(f"hot{i}", system + [2 + i], max_tokens=1,
                                       arrival=2.0 + i))
        out = scheduler_step(scheduler)
        order += [s.req_id for s in out.scheduled if s.sample]
        if "cold" in order:
            break
    assert order[0] == "hot0", "the cached prefix should go first"
    # 40 cached tokens are worth 10 steps of waiting at one block per step.
    assert "cold" in order and order.index("cold") <= 40 // BLOCK + 1


def test_fcfs_ignores_cache_hits():
    kv = KVCacheManager(num_blocks=256, block_size=BLOCK)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, max_model_len=200), kv)
    system = list(range(500, 540))
    scheduler.add_request(_request("warm", system + [1], max_tokens=1))
    scheduler_step(scheduler)
    scheduler.add_request(_request("cold", range(600, 620), max_tokens=1, arrival=1.0))
    scheduler.add_request(_request("hot", system + [2], max_tokens=1, arrival=2.0))
    assert [s.req_id for s in scheduler_step(scheduler).scheduled] == ["cold"]


# End to end ----------------------------------------------------------------------------

class ComputedTokens:
    """Counts the tokens the model computes for each request id."""

    def __init__(self, llm: LLM) -> None:
        self.per_request: Counter[str] = Counter()
        submit = llm.engine.runner.submit

        def counting(scheduler_output: SchedulerOutput, *args) -> StepInFlight | None:
            for scheduled in scheduler_output.scheduled:
                self.per_request[scheduled.req_id] += len(scheduled.token_ids)
            llm.engine.kv_manager.pool.check_integrity()
            return submit(scheduler_output, *args)

        llm.engine.runner.submit = counting


def _llm(path, **options) -> LLM:
    # Batch-invariant: outputs with and without cache hits (other batches, other chunks)
    # are compared exactly, which the default mode's kernels do not promise on every CPU.
    return LLM(str(path), **{"dtype": "float32", "device": "cpu", "block_size": BLOCK,
                             "kv_cache_memory": "4MiB", "batch_invariant": True, **options})


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _assert_all_free(llm: LLM) -> None:
    pool = llm.engine.kv_manager.pool
    pool.check_integrity()
    assert not llm.engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_usable_blocks
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))


def _shared_prefix_batch(prefix_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(5, 380) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(5, 380) for _ in range(rng.randrange(1, 14))]
               for _ in range(6)]
    return prompts + [list(prefix), list(prompts[0])]  # the bare prefix and a repeat


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama-gqa")


@pytest.mark.parametrize("prefix_len", [3, BLOCK, 5 * BLOCK + 2],
                         ids=["under-a-block", "one-block", "blocks-and-a-partial"])
@pytest.mark.parametrize("mode", ["plain", "chunked", "preempting"])
def test_greedy_outputs_identical_with_cache_on_and_off(llama, prefix_len, mode):
    prompts = _shared_prefix_batch(prefix_len, seed=prefix_len)
    options = {"chunked": {"max_num_batched_tokens": 7},
               # Room for about three of these requests at a time.
               "preempting": {"kv_cache_memory": 3 * 40 * KV_BYTES_PER_TOKEN}}.get(mode, {})
    reference = _tokens(_llm(llama, enable_prefix_caching=False, **options), prompts)
    llm = _llm(llama, **options)
    ComputedTokens(llm)
    # Twice: hits inside one batch, then hits on what the first batch left cached.
    assert _tokens(llm, prompts) == reference
    assert _tokens(llm, prompts) == reference
    stats = llm.engine.kv_manager.stats
    assert stats.hits > 0
    if mode == "preempting":
        assert llm.engine.scheduler.num_preemptions_total > 0
    _assert_all_free(llm)


def test_repeated_prompt_prefills_only_what_follows_its_cached_blocks(llama):
    llm = _llm(llama)
    counter = ComputedTokens(llm)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    for prompt_len, cached in ((30, 28), (32, 28)):  # 32: the last block is recomputed
        prompt = list(range(10, 10 + prompt_len))
        first, second = (llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
                         for _ in range(2))
        assert first.num_cached_tokens == 0 or prompt_len == 32
        assert second.num_cached_tokens == cached
        assert counter.per_request[second.request_id] == prompt_len - cached + 4
        assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_second_chat_turn_hits_the_first_turns_prompt_and_answer(llama):
    llm = _llm(llama)
    counter = ComputedTokens(llm)
    turn1 = list(range(40, 63))
    first = llm.generate({"prompt_token_ids": turn1}, GREEDY, use_tqdm=False)[0]
    answer = first.outputs[0].token_ids
    turn2 = turn1 + answer + [7, 8, 9]
    second = llm.generate({"prompt_token_ids": turn2}, GREEDY, use_tqdm=False)[0]
    # Every full block of computed KV: the answer's last token was sampled, never computed.
    expected = (len(turn1) + len(answer) - 1) // BLOCK * BLOCK
    assert second.num_cached_tokens == expected > len(turn1)
    assert counter.per_request[second.request_id] == len(turn2) - expected + GREEDY.max_tokens - 1
    reference = _llm(llama, enable_prefix_caching=False)
    assert _tokens(reference, [turn2]) == [second.outputs[0].token_ids]


def test_pool_too_small_evicts_and_stays_exact(llama):
    rng = random.Random(7)
    systems = [[rng.randrange(5, 380) for _ in range(24)] for _ in range(4)]
    waves = [[s + [rng.randrange(5, 380) for _ in range(rng.randrange(2, 9))]
              for s in systems for _ in range(2)] for _ in range(3)]
    memory = 40 * BLOCK * KV_BYTES_PER_TOKEN  # 40 blocks: less than the waves fill
    reference = _llm(llama, enable_prefix_caching=False, kv_cache_memory=memory)
    llm = _llm(llama, kv_cache_memory=memory)
    ComputedTokens(llm)  # checks the pool before every step
    pool = llm.engine.kv_manager.pool
    registered: set[bytes] = set()
    register = pool.register

    def spy(block_id: int, block_hash: bytes) -> None:
        registered.add(block_hash)
        register(block_id, block_hash)

    pool.register = spy
    for wave in waves:
        assert _tokens(llm, wave) == _tokens(reference, wave)
        _assert_all_free(llm)
    still_cached = {h for h in registered if pool.lookup(h) is not None}
    assert len(still_cached) < len(registered), "the pool should have evicted something"
    assert llm.engine.kv_manager.stats.hits > 0


def test_n_samples_prefill_their_prompt_once(llama):
    prompt = list(range(20, 41))  # 5 full blocks and a token
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    llm = _llm(llama)
    counter = ComputedTokens(llm)
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    computed = sorted(counter.per_request.values())
    assert computed == [1 + 5] * 3 + [21 + 5]
    assert output.num_cached_tokens == 0
    off = _llm(llama, enable_prefix_caching=False)
    reference = off.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert [c.token_ids for c in output.outputs] == [c.token_ids for c in reference.outputs]


def test_salted_requests_never_share_blocks(llama):
    llm = _llm(llama)
    prompt = list(range(60, 90))
    seen: dict[str, set[int]] = {}
    submit = llm.engine.runner.submit

    def record(scheduler_output: SchedulerOutput, *args) -> StepInFlight | None:
        for scheduled in scheduler_output.scheduled:
            seen.setdefault(scheduled.req_id, set()).update(scheduled.block_ids)
        return submit(scheduler_output, *args)

    llm.engine.runner.submit = record
    salts = ["a", "b", None, "a"]
    outputs = llm.generate([{"prompt_token_ids": prompt, "cache_salt": s} if s else
                            {"prompt_token_ids": prompt} for s in salts], GREEDY,
                           use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [0, 0, 0, 28]
    ids = [seen[o.request_id] for o in outputs]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert ids[0] & ids[3]
    for bad in (5, "", "x" * 257, "\ud800"):
        with pytest.raises(ValueError, match="cache_salt"):
            llm.generate({"prompt_token_ids": prompt, "cache_salt": bad}, GREEDY,
                         use_tqdm=False)


def test_prompt_logprobs_identical_with_cache_on_and_off(llama):
    prompt = list(range(70, 95))
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2, ignore_eos=True)

    def run(llm: LLM):
        llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)  # warms the cache
        return llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]

    on, off = run(_llm(llama)), run(_llm(llama, enable_prefix_caching=False))
    assert on.num_cached_tokens == 0
    assert len(on.prompt_logprobs) == len(prompt)
    for a, b in zip(on.prompt_logprobs[1:], off.prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_failed_step_leaves_no_block_without_kv_in_the_cache(llama, failure):
    """The blocks a failed step registered were never written: later requests with the
    same prefix must compute them, not read them."""
    prompts = [list(range(200, 230)), list(range(200, 226)) + [5, 6]]
    reference = _tokens(_llm(llama, enable_prefix_caching=False), prompts)
    llm = _llm(llama)
    engine = llm.engine
    submit = engine.runner.submit
    calls = 0

    def failing_once(scheduler_output: SchedulerOutput, *args) -> StepInFlight | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise failure("injected")
        return submit(scheduler_output, *args)

    engine.runner.submit = failing_once
    with pytest.raises(EngineStepError if failure is RuntimeError else KeyboardInterrupt):
        llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert engine.kv_manager.pool.num_cached_blocks == 0
    _assert_all_free(llm)
    assert _tokens(llm, prompts) == reference


def test_requests_of_a_failed_step_are_recomputed_if_not_aborted(llama):
    prompts = [list(range(300, 330)), list(range(300, 328)) + [9]]
    reference = _tokens(_llm(llama, enable_prefix_caching=False), prompts)
    llm = _llm(llama)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, GREEDY)
    submit = engine.runner.submit
    engine.runner.submit = lambda *_: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(EngineStepError) as failed:
        engine.step()
    assert failed.value.request_ids == ["0", "1"]
    # "1" had found "0"'s blocks, which the failed step never wrote; with "0" gone, nothing
    # rewrites them: "1" must compute its prompt again.
    engine.abort_request("0")
    engine.runner.submit = submit
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["1"].outputs[0].token_ids == reference[1]
    _assert_all_free(llm)


def test_progress_bar_shows_the_hit_rate(llama, capsys):
    llm = _llm(llama)
    prompt = list(range(130, 160))
    llm.generate([{"prompt_token_ids": prompt}] * 2, GREEDY, use_tqdm=True)
    assert "prefix cache hit rate: 46.7%" in capsys.readouterr().err  # 28 of 60 tokens


def test_reset_prefix_cache_forgets_everything(llama):
    llm = _llm(llama)
    prompt = list(range(100, 130))
    llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    assert llm.engine.reset_prefix_cache() > 0
    assert llm.engine.kv_manager.pool.num_cached_blocks == 0
    again = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
