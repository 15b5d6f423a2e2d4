"""Greedy output at float32 equals transformers' generate, token for token."""
from __future__ import annotations

import pytest

from conftest import DEVICES, assert_greedy_matches, hf_greedy, random_prompts
from kvflow import LLM, SamplingParams
from kvflow.engine.llm_engine import LLMEngine

MAX_TOKENS = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _run(path, prompts, **engine_options):
    llm = LLM(str(path), dtype="float32",
              **{"device": "cpu", "kv_cache_memory": "16MiB", **engine_options})
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outputs]


def _assert_no_leak(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    engine.kv_manager.pool.check_integrity()
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.pool.num_usable_blocks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["llama-gqa", "llama-mha-tied-bias", "llama3-rope",
                                     "llama-linear-rope", "qwen2", "qwen3", "mistral-window"])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["native", "eager"])
def test_greedy_batch_matches_transformers(variant, device, enforce_eager, checkpoint, hf_model):
    if device == "cuda" and enforce_eager:
        pytest.skip("the native kernels are CPU-only: on CUDA both runs are the same")
    path = checkpoint(variant)
    prompts = random_prompts(8, seed=1)
    assert len({len(p) for p in prompts}) > 4
    llm, tokens = _run(path, prompts, device=device, enforce_eager=enforce_eager)
    reference = [hf_greedy(hf_model(path), p, MAX_TOKENS) for p in prompts]
    assert_greedy_matches(tokens, reference, MAX_TOKENS)
    assert len({tuple(t) for t in tokens}) > 1, "outputs should differ between prompts"
    _assert_no_leak(llm.engine)


@pytest.fixture(scope="module")
def llama_reference(checkpoint, hf_model):
    path = checkpoint("llama-gqa")
    prompts = random_prompts(10, seed=2, low=10, high=60)
    return path, prompts, [hf_greedy(hf_model(path), p, MAX_TOKENS) for p in prompts]


def test_chunked_prefill_matches(llama_reference):
    path, prompts, reference = llama_reference
    llm, tokens = _run(path, prompts, max_num_batched_tokens=7)
    assert_greedy_matches(tokens, reference, MAX_TOKENS)
    _assert_no_leak(llm.engine)


def test_preemption_recomputes_identically(llama_reference):
    path, prompts, reference = llama_reference
    longest = max(len(p) for p in prompts) + MAX_TOKENS
    # Room for about two requests at a time: the rest must be preempted and recomputed.
    kv_bytes = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv_heads * head_dim * float32 bytes
    blocks = 2 * (longest // 4 + 1) + 1
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=4,
              kv_cache_memory=blocks * 4 * kv_bytes)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert_greedy_matches([o.outputs[0].token_ids for o in outputs], reference, MAX_TOKENS)
    _assert_no_leak(llm.engine)


def test_sliding_window_shorter_than_prompt(checkpoint, hf_model):
    path = checkpoint("mistral-window")  # window of 12 tokens
    prompts = random_prompts(4, seed=3, low=30, high=50)
    _, tokens = _run(path, prompts, max_num_batched_tokens=16)
    assert_greedy_matches(tokens, [hf_greedy(hf_model(path), p, MAX_TOKENS) for p in prompts],
                          MAX_TOKENS)
    # The window must matter: the same weights without it decode differently.
    unwindowed = checkpoint("mistral-window", sliding_window=None)
    _, full = _run(unwindowed, prompts)
    assert full != tokens


def test_sharded_checkpoint_and_bfloat16(checkpoint, tmp_path):
    from checkpoints import build_checkpoint

    sharded = build_checkpoint(tmp_path / "sharded", "qwen3", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    prompts = random_prompts(3, seed=4)
    _, tokens = _run(sharded, prompts)
    _, single = _run(checkpoint("qwen3"), prompts)
    assert tokens == single
    llm = LLM(str(sharded), dtype="bfloat16", device="cpu", kv_cache_memory="8MiB")
    out = llm.generate({"prompt_token_ids": prompts[0]}, GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
