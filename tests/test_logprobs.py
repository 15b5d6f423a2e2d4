"""Logprobs and prompt_logprobs against transformers' log-softmax at float32."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_prompts
from kvflow import LLM, SamplingParams


@pytest.fixture(scope="module")
def setup(checkpoint, hf_model):
    path = checkpoint("qwen2")
    # Batch-invariant: two requests' prompt logprobs, computed in different steps, are
    # compared bitwise (in the default mode they differ in the last bits on some CPUs).
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB",
               max_num_batched_tokens=16, batch_invariant=True), hf_model(path)


def _hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row i predicts token i + 1


def test_sample_logprobs_match(setup):
    llm, hf = setup
    prompts = random_prompts(4, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    for prompt, out in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                 params, use_tqdm=False)):
        sample = out.outputs[0]
        reference = _hf_logprobs(hf, prompt + sample.token_ids)
        total = 0.0
        for step, (token, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
            row = reference[len(prompt) - 1 + step]
            assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert entry[token].rank == 1  # greedy picks the top token
            top = row.topk(3)
            assert set(entry) == set(top.indices.tolist())
            for token_id, value in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[token_id].logprob == pytest.approx(value, abs=1e-4)
            assert isinstance(entry[token].decoded_token, str)
            total += entry[token].logprob
        assert sample.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_prompt_logprobs_match_across_chunks(setup):
    llm, hf = setup
    prompt = random_prompts(1, seed=6, low=45, high=46)[0]  # three chunks of 16
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    reference = _hf_logprobs(hf, prompt)
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        expected = reference[i - 1, prompt[i]].item()
        assert entry[prompt[i]].logprob == pytest.approx(expected, abs=1e-4)
        assert entry[prompt[i]].rank == int((reference[i - 1] > expected).sum()) + 1
        assert len(entry) in (2, 3)  # the prompt token plus the top 2 (it may be one of them)
    nll = -sum(e[t].logprob for e, t in zip(out.prompt_logprobs[1:], prompt[1:]))
    assert math.isfinite(nll) and nll > 0


def test_prompt_logprobs_survive_n_samples(setup):
    llm, _ = setup
    prompt = random_prompts(1, seed=7, low=20, high=21)[0]
    params = SamplingParams(temperature=1.0, n=3, max_tokens=4, prompt_logprobs=0, seed=1)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(prompt)
    assert all(len(entry) == 1 for entry in out.prompt_logprobs[1:])


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(setup):
    llm, _ = setup
    prompt = random_prompts(1, seed=8, low=40, high=41)[0]  # three chunks of 16
    scored, generated = llm.generate(
        [{"prompt_token_ids": prompt}] * 2,
        [SamplingParams(max_tokens=0, prompt_logprobs=1),
         SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=1, ignore_eos=True)],
        use_tqdm=False)
    assert scored.finished and scored.outputs[0].token_ids == []
    assert scored.outputs[0].text == "" and scored.outputs[0].finish_reason == "length"
    assert scored.prompt_logprobs == generated.prompt_logprobs
    assert len(generated.outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="max_tokens must be non-negative, got -1"):
        SamplingParams(max_tokens=-1)


def test_truncate_prompt_tokens_keeps_the_prompts_end(setup):
    llm, _ = setup
    prompt = random_prompts(1, seed=9, low=30, high=31)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    cut = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                      truncate_prompt_tokens=10), use_tqdm=False)[0]
    tail = llm.generate({"prompt_token_ids": prompt[-10:]}, greedy, use_tqdm=False)[0]
    assert cut.prompt_token_ids == prompt[-10:]
    assert cut.outputs[0].token_ids == tail.outputs[0].token_ids
    whole = llm.generate({"prompt_token_ids": prompt},
                         SamplingParams(max_tokens=1, truncate_prompt_tokens=-1),
                         use_tqdm=False)[0]
    assert whole.prompt_token_ids == prompt  # -1 keeps up to max_model_len
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be -1 .* got 0"):
        SamplingParams(truncate_prompt_tokens=0)
