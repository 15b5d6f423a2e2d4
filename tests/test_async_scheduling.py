"""Async scheduling (EngineArgs.async_scheduling): each step formed and submitted while the
one before it runs, its requests' new tokens placeholders that the runner fills on the
device. Its outputs must be the sync loop's, bit for bit in batch-invariant mode, for
greedy and seeded sampling, chunked prefills, stop tokens met one step late, max_tokens,
min_tokens, logit_bias, preemptions and aborts, with the steps of requests that need
their tokens on the host (penalties, logprobs) run in turn; and the prefix cache must
never key a block by a placeholder."""
from __future__ import annotations

import pytest

from kvflow import LLM, SamplingParams
from kvflow.engine.args import EngineArgs

MAX_TOKENS = 14


def engine(path, async_scheduling: bool, **options) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", batch_invariant=True,
               async_scheduling=async_scheduling,
               **{"kv_cache_memory": "8MiB", "max_num_batched_tokens": 40, **options})


def run(llm: LLM, prompts, params):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outputs]


def count_ahead(llm: LLM) -> list[int]:
    """How many steps were formed ahead of the one before them."""
    calls = [0]
    apply = llm.engine.scheduler.apply_ahead

    def counting(output):
        calls[0] += 1
        apply(output)

    llm.engine.scheduler.apply_ahead = counting
    return calls


def mixed_params(stop_id: int):
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [
        greedy,
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=MAX_TOKENS,
                       ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=3, n=2, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_id],
                       min_tokens=6),
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                       logit_bias={stop_id: 3.0}),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    ]


@pytest.fixture(scope="module")
def prompts():
    from conftest import random_prompts

    return random_prompts(7, seed=11, low=5, high=60)


def test_outputs_are_the_sync_loops(checkpoint, prompts):
    path = checkpoint("llama-gqa")
    sync = engine(path, False)
    first = run(sync, prompts[:1], [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                   ignore_eos=True)])
    stop_id = first[0][0][0][4]  # the greedy request meets it at its fifth token
    params = mixed_params(stop_id)
    prompts = list(prompts)
    prompts[3] = prompts[4] = prompts[0]  # the requests that stop on it
    expected = run(sync, prompts, params)
    assert expected[3][0][1] == "stop" and len(expected[3][0][0]) <= 5
    llm = engine(path, True)
    ahead = count_ahead(llm)
    steps = [0]
    step = llm.engine.step
    llm.engine.step = lambda: steps.__setitem__(0, steps[0] + 1) or step()
    assert run(llm, prompts, params) == expected
    assert ahead[0] >= steps[0] * 2 // 3  # most steps were formed ahead of the one before
    pool = llm.engine.kv_manager.pool
    pool.check_integrity()
    assert pool.num_free_blocks == pool.num_usable_blocks


def test_steps_that_need_host_tokens_run_in_turn(checkpoint, prompts):
    """Penalties and logprobs read the tokens on the host: while such a request is in a
    step, the next waits for it; the outputs are still the sync loop's."""
    path = checkpoint("llama-gqa")
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                             repetition_penalty=1.3, frequency_penalty=0.5),
              SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                             logprobs=2)]
    expected = run(engine(path, False), prompts[:2], params)
    llm = engine(path, True)
    ahead = count_ahead(llm)
    assert run(llm, prompts[:2], params) == expected
    assert ahead[0] == 0
    alone = run(llm, prompts[:1], [SamplingParams(temperature=0.0, max_tokens=6,
                                                  ignore_eos=True)])
    assert ahead[0] > 0 and len(alone[0][0][0]) == 6


def test_preemption_under_async_scheduling(checkpoint, prompts):
    """A KV cache too small for every request at once: the step formed ahead preempts
    nothing and is left empty where a request does not fit; the next step, formed in
    turn, preempts."""
    path = checkpoint("llama-gqa")
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 6
    sync = engine(path, False, kv_cache_memory="56KiB")
    expected = run(sync, prompts[:6], params)
    assert sync.engine.scheduler.num_preemptions_total > 0
    llm = engine(path, True, kv_cache_memory="56KiB")
    assert run(llm, prompts[:6], params) == expected
    assert llm.engine.scheduler.num_preemptions_total > 0
    pool = llm.engine.kv_manager.pool
    pool.check_integrity()
    assert pool.num_free_blocks == pool.num_usable_blocks


def test_an_abort_while_a_step_is_formed_ahead(checkpoint, prompts):
    path = checkpoint("llama-gqa")
    llm = engine(path, True)
    core = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for i, prompt in enumerate(prompts[:3]):
        core.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    for _ in range(6):
        core.step()
    assert len(core._in_flight) == 1  # a step formed ahead waits
    core.abort_request("r1")
    finished = {}
    while core.has_unfinished_requests():
        for output in core.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert set(finished) == {"r0", "r2"} and all(len(t) == 30 for t in finished.values())
    pool = core.kv_manager.pool
    pool.check_integrity()
    assert pool.num_free_blocks == pool.num_usable_blocks


def test_the_prefix_cache_never_keys_a_block_by_a_placeholder(checkpoint, prompts):
    """A second turn that repeats the first turn's prompt and answer finds the answer's
    blocks cached, as in the sync loop: the block a placeholder completed is registered
    once its token is known, under the token's hash."""
    path = checkpoint("llama-gqa")
    hits = []
    for async_scheduling in (False, True):
        llm = engine(path, async_scheduling)
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        answer = run(llm, prompts[:1], [params])[0][0][0]
        before = llm.engine.kv_manager.stats.hits
        run(llm, [prompts[0] + answer + [5, 6, 7]], [params])
        hits.append(llm.engine.kv_manager.stats.hits - before)
    block_size = 16
    assert hits[0] >= (len(prompts[0]) + 40) // block_size * block_size - block_size
    assert hits[1] == hits[0]


@pytest.mark.parametrize("option", [{"speculative_config": {"method": "ngram",
                                                             "num_speculative_tokens": 2}},
                                    {"tensor_parallel_size": 2}])
def test_async_scheduling_refuses_what_it_cannot_run(option):
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineArgs(async_scheduling=True, **option)
