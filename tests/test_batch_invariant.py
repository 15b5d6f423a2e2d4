"""Batch-invariant mode: one request's logits, logprobs and tokens are bitwise the same alone,
inside random batches, however its prompt is chunked, with its prefix cached or not, and
with n-gram speculation on or off, in bf16 and float32."""
from __future__ import annotations

import random

import pytest

from conftest import random_prompts
from kvflow import LLM, SamplingParams

TARGET = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5,
                        prompt_logprobs=5)
# Long enough to span several KV blocks, chunks and attention tiles; repetitive, so that
# prompt lookup proposes drafts.
PROMPT = (random_prompts(1, seed=5, low=40, high=41)[0] * 3)[:110]


def _llm(checkpoint, variant: str, dtype: str, **options) -> LLM:
    return LLM(str(checkpoint(variant)), dtype=dtype, device="cpu", kv_cache_memory="8MiB",
               batch_invariant=True, max_logprobs=-1, **options)


def _fingerprint(output) -> tuple:  # noqa: ANN001
    """Everything the request returns that its logits decide, as exact floats."""
    def entries(logprobs):  # noqa: ANN001, ANN202
        return [None if e is None else sorted((t, lp.logprob, lp.rank) for t, lp in e.items())
                for e in logprobs or []]

    sample = output.outputs[0]
    return tuple(sample.token_ids), entries(sample.logprobs), entries(output.prompt_logprobs)


def _others(rng: random.Random, count: int) -> tuple[list[dict], list[SamplingParams]]:
    prompts = random_prompts(count, seed=rng.randrange(10**6), low=1, high=90)
    params = [SamplingParams(temperature=rng.choice([0, 0.7, 1.2]), seed=rng.randrange(99),
                             max_tokens=rng.randrange(1, 30), ignore_eos=True,
                             top_p=rng.choice([1.0, 0.9]))
              for _ in prompts]
    return [{"prompt_token_ids": p} for p in prompts], params


@pytest.fixture(scope="module", params=[("qwen3", "bfloat16"), ("mistral-window", "float32"),
                                        ("llama-mha-tied-bias", "bfloat16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request, checkpoint):
    variant, dtype = request.param
    alone = _llm(checkpoint, variant, dtype, enable_prefix_caching=False)
    reference = _fingerprint(alone.generate([{"prompt_token_ids": PROMPT}], TARGET,
                                            use_tqdm=False)[0])
    return variant, dtype, alone, reference


def test_the_same_alone_and_inside_random_batches(model):
    _, _, llm, reference = model
    rng = random.Random(0)
    for count in (1, rng.randrange(2, 20), 64):
        prompts, params = _others(rng, count)
        at = rng.randrange(count + 1)
        prompts.insert(at, {"prompt_token_ids": PROMPT})
        params.insert(at, TARGET)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert _fingerprint(outputs[at]) == reference, f"inside a batch of {count + 1}"


@pytest.mark.parametrize("budget", [16, 37])
def test_the_same_however_the_prompt_is_chunked(model, checkpoint, budget):
    variant, dtype, _, reference = model
    llm = _llm(checkpoint, variant, dtype, enable_prefix_caching=False,
               max_num_batched_tokens=budget)
    prompts, params = _others(random.Random(budget), 5)
    outputs = llm.generate([{"prompt_token_ids": PROMPT}, *prompts], [TARGET, *params],
                           use_tqdm=False)
    assert _fingerprint(outputs[0]) == reference


def test_the_same_with_its_prefix_cached(model, checkpoint):
    variant, dtype, _, reference = model
    llm = _llm(checkpoint, variant, dtype)
    # A request that shares the first 70 tokens fills the cache; the target then hits it.
    llm.generate([{"prompt_token_ids": PROMPT[:70] + [9, 9, 9]}], SamplingParams(max_tokens=2),
                 use_tqdm=False)
    # prompt_logprobs needs every prompt position computed, so it never hits the cache.
    no_prompt_logprobs = TARGET.clone()
    no_prompt_logprobs.prompt_logprobs = None
    output = llm.generate([{"prompt_token_ids": PROMPT}], no_prompt_logprobs,
                          use_tqdm=False)[0]
    assert output.num_cached_tokens >= 64
    assert _fingerprint(output)[:2] == reference[:2]


SAMPLED = SamplingParams(temperature=0.7, top_p=0.95, seed=7, max_tokens=24, ignore_eos=True,
                         logprobs=5)


def test_the_same_with_ngram_speculation(model, checkpoint):
    """Greedy and seeded sampled requests alike: verification takes the token sampling
    would at each position (its noise seeded by the request and the position)."""
    variant, dtype, alone, reference = model
    sampled = _fingerprint(alone.generate([{"prompt_token_ids": PROMPT}], SAMPLED,
                                          use_tqdm=False)[0])
    llm = _llm(checkpoint, variant, dtype, enable_prefix_caching=False,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                   "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                                   "disable_by_batch_size": 64, "min_acceptance_rate": 0})
    prompts, params = _others(random.Random(7), 6)
    outputs = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT},
                            *prompts], [TARGET, SAMPLED, *params], use_tqdm=False)
    assert llm.engine.stats.spec_decode.num_drafts > 0
    assert _fingerprint(outputs[0]) == reference
    assert _fingerprint(outputs[1]) == sampled


def test_batch_invariant_needs_the_native_kernels(checkpoint):
    with pytest.raises(ValueError, match="enforce_eager"):
        LLM(str(checkpoint("llama-gqa")), device="cpu", batch_invariant=True, enforce_eager=True)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        LLM(str(checkpoint("llama-gqa")), device="cpu", dtype="float16", batch_invariant=True)


def test_a_thousand_greedy_runs_under_random_load_give_one_completion(checkpoint, tmp_path):
    """Through `kvflow serve --batch-invariant`: one greedy prompt sent 1,000 times while
    random other requests (sampled, of every length, some streamed and abandoned) share
    its batches."""
    import asyncio

    import httpx

    from server_process import ServerProcess

    # Wide enough that the default mode's kernels (chosen per batch size) round differently.
    model = checkpoint("qwen3", hidden_size=512, intermediate_size=1024)
    server = ServerProcess(model, "--dtype", "bfloat16", "--device", "cpu",
                           "--kv-cache-memory", "16MiB", "--batch-invariant",
                           "--max-num-batched-tokens", "64", log=tmp_path / "serve.log")
    server.wait_ready()
    target = {"prompt": PROMPT[:60], "max_tokens": 6, "temperature": 0, "logprobs": 2}
    rng = random.Random(3)

    async def scenario() -> tuple[set, int]:
        limits = httpx.Limits(max_connections=48)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            seen: set = set()

            async def one() -> None:
                response = await http.post("/v1/completions", json=target)
                assert response.status_code == 200, response.text
                choice = response.json()["choices"][0]
                seen.add((choice["text"], tuple(choice["logprobs"]["token_logprobs"])))

            async def noise() -> None:
                body = {"prompt": random_prompts(1, seed=rng.randrange(10**6), low=1,
                                                 high=120)[0],
                        "max_tokens": rng.randrange(1, 12), "temperature": rng.choice([0, 1.0]),
                        "stream": rng.random() < 0.3}
                await http.post("/v1/completions", json=body)

            runs = [one() for _ in range(1000)] + [noise() for _ in range(300)]
            rng.shuffle(runs)
            semaphore = asyncio.Semaphore(40)

            async def bounded(run) -> None:  # noqa: ANN001
                async with semaphore:
                    await run

            await asyncio.gather(*(bounded(r) for r in runs))
            return seen, len(runs)

    try:
        seen, sent = asyncio.run(scenario())
    finally:
        assert server.stop()
    assert sent == 1300 and len(seen) == 1, f"{len(seen)} distinct completions"


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_weights_are_batch_invariant_too(checkpoint, quantization):
    """Every batch size runs the method's native GEMV (int4: groups of 32 columns here)."""
    options = dict(enable_prefix_caching=False, quantization=quantization,
                   quantization_group_size=32)
    llm = _llm(checkpoint, "qwen3", "bfloat16", **options)
    reference = _fingerprint(llm.generate([{"prompt_token_ids": PROMPT}], TARGET,
                                          use_tqdm=False)[0])
    prompts, params = _others(random.Random(11), 24)
    outputs = llm.generate([*prompts, {"prompt_token_ids": PROMPT}], [*params, TARGET],
                           use_tqdm=False)
    assert _fingerprint(outputs[-1]) == reference
    chunked = _llm(checkpoint, "qwen3", "bfloat16", max_num_batched_tokens=37, **options)
    assert _fingerprint(chunked.generate([{"prompt_token_ids": PROMPT}], TARGET,
                                         use_tqdm=False)[0]) == reference
