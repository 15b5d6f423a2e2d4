"""Speculative decoding end to end: outputs match decoding without it, token for token
(greedy, float32), for both proposers and several draft lengths, in mixed batches, under
chunked prefill and preemption, with stops inside accepted runs; seeded sampling repeats;
no KV block leaks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.demo import demo_draft_path
from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.ngram import propose_ngram
from kvflow.spec_decode.proposer import ProposalRequest

PROMPTS = [
    "import os\nimport sys\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "x",
]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def _config(method: str, k: int, **extra) -> dict:
    config = {"method": method, "num_speculative_tokens": k, "disable_by_batch_size": None,
              **extra}
    if method == "ngram":
        config.update(prompt_lookup_min=1, prompt_lookup_max=3)
    else:
        config["model"] = str(demo_draft_path())
    return config


def _tokens(llm: LLM, params: SamplingParams | list[SamplingParams],
            prompts: list[str] = PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _no_leaks(llm: LLM) -> bool:
    pool = llm.engine.kv_manager.pool
    return pool.num_free_blocks == pool.num_usable_blocks


def _llm(**options) -> LLM:
    """Batch-invariant: greedy tokens with and without speculation (other batches, other
    query lengths) are compared exactly."""
    return LLM(dtype="float32", batch_invariant=True, **{"kv_cache_memory": "64MiB", **options})


@pytest.fixture(scope="module")
def plain():
    return _llm()


@pytest.fixture(scope="module")
def reference(plain):
    return _tokens(plain, GREEDY)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_outputs_are_unchanged(method, k, reference):
    llm = _llm(speculative_config=_config(method, k))
    # Alone, then all together: in the batch some requests verify drafts and others
    # (no n-gram match yet, or a sampled request) do not.
    assert [_tokens(llm, GREEDY, [p])[0] for p in PROMPTS] == reference
    sampled = SamplingParams(temperature=0.9, seed=5, max_tokens=40)
    together = _tokens(llm, [GREEDY] * len(PROMPTS) + [sampled], PROMPTS + [PROMPTS[0]])
    assert together[:-1] == reference
    stats = llm.engine.stats.spec_decode
    assert stats.num_accepted_tokens > 0 and stats.num_draft_tokens >= stats.num_accepted_tokens
    assert len(stats.num_accepted_tokens_per_pos) <= k
    assert _no_leaks(llm)


def test_chunked_prefill_and_preemption(plain, reference):
    per_block = plain.engine.model_config.kv_bytes_per_token(plain.engine.dtype) * 16
    # 12 blocks for four requests of up to 5 blocks each: they preempt one another.
    llm = _llm(kv_cache_memory=13 * per_block, max_num_batched_tokens=16,
               speculative_config=_config("draft_model", 4))
    assert _tokens(llm, GREEDY) == reference
    assert llm.engine.stats.num_preemptions > 0
    assert llm.engine.stats.spec_decode.num_accepted_tokens > 0
    assert _no_leaks(llm)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_stops_inside_accepted_runs(method, plain, reference):
    llm = _llm(speculative_config=_config(method, 5))
    tokenizer = llm.get_tokenizer()
    text = tokenizer.decode(reference[0])
    stop_string = text[len(text) // 2:len(text) // 2 + 3]
    stop_token = reference[2][20]
    params = [SamplingParams(temperature=0, max_tokens=40, stop=[stop_string]),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                             stop_token_ids=[stop_token]),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, min_tokens=30,
                             stop_token_ids=[stop_token])]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[2]]
    expected = plain.generate(prompts, params, use_tqdm=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    for want, have in zip(expected, got):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        assert have.outputs[0].text == want.outputs[0].text
        assert have.outputs[0].finish_reason == want.outputs[0].finish_reason
        assert have.outputs[0].stop_reason == want.outputs[0].stop_reason
    assert got[0].outputs[0].stop_reason == stop_string
    assert llm.engine.stats.spec_decode.num_accepted_tokens > 0
    assert _no_leaks(llm)


def test_seeded_sampling_repeats_and_logprobs_match_the_tokens():
    llm = LLM(dtype="float32", kv_cache_memory="64MiB",
              speculative_config=_config("draft_model", 3))
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=30, logprobs=2)
    first = llm.generate(PROMPTS, params, use_tqdm=False)
    second = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]
    for output in first:
        completion = output.outputs[0]
        assert len(completion.logprobs) == len(completion.token_ids)
        assert all(token in entry for token, entry in zip(completion.token_ids,
                                                         completion.logprobs))
    assert llm.engine.stats.spec_decode.num_drafts > 0 and _no_leaks(llm)
    # Pending proposals die with their requests (the runner hears of a request's end at the
    # next step: one more, greedy, request makes one).
    llm.generate("x", SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert llm.engine.runner.draft_probs == {}


def test_draft_model_proposals_greedy_and_sampled():
    """A greedy request gets the draft model's own greedy continuation, with no
    distribution (one-hot); a sampled one gets drafts drawn from the distribution it
    returns, at the request's temperature."""
    llm = LLM(dtype="float32", kv_cache_memory="64MiB",
              speculative_config=_config("draft_model", 3))
    proposer = llm.engine.runner.speculator.proposer
    tokens = llm.get_tokenizer().encode(PROMPTS[1])

    def request(req_id: str, first_block: int, temperature: float) -> ProposalRequest:
        return ProposalRequest(req_id=req_id, token_ids=tokens,
                               num_computed_tokens=len(tokens) - 1,
                               block_ids=list(range(first_block, first_block + 4)),
                               max_drafts=3, temperature=temperature,
                               generator=torch.Generator().manual_seed(0))

    proposals = proposer.propose([request("greedy", 1, 0.0), request("hot", 5, 1.5)])
    draft = LLM(str(demo_draft_path()), dtype="float32", kv_cache_memory="16MiB")
    assert proposals.token_ids["greedy"] == draft.generate(
        {"prompt_token_ids": tokens}, SamplingParams(temperature=0, max_tokens=3,
                                                     ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    assert "greedy" not in proposals.probs
    probs = proposals.probs["hot"]
    assert probs.shape == (3, llm.get_tokenizer().vocab_size)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert all(probs[i, t] > 0 for i, t in enumerate(proposals.token_ids["hot"]))
    assert probs.max() < 1.0 - 1e-3  # spread by the temperature, not an argmax


def test_speculation_stops_above_the_batch_size_limit():
    llm = LLM(dtype="float32", kv_cache_memory="64MiB",
              speculative_config=_config("ngram", 3, disable_by_batch_size=2))
    _tokens(llm, GREEDY)  # four requests at once: no drafts while more than two run
    alone = llm.engine.stats.spec_decode.num_drafts
    _tokens(llm, GREEDY, PROMPTS[:1])
    assert llm.engine.stats.spec_decode.num_drafts > alone


def test_propose_ngram():
    tokens = np.array([1, 2, 3, 4, 9, 1, 2, 3, 4, 5, 7, 1, 2, 3])
    assert propose_ngram(tokens, 1, 3, 2) == [4, 5]  # the latest earlier "1 2 3"
    assert propose_ngram(tokens, 4, 5, 2) == []  # "3 1 2 3"... never occurred before
    assert propose_ngram(np.array([5, 5]), 1, 2, 4) == [5]
    assert propose_ngram(np.array([5]), 1, 2, 4) == []


def test_propose_ngram_matches_a_sliding_window_search():
    """Against the plain definition: slide every window length over the history, longest
    first, and take the latest hit; on short random texts over tiny vocabularies, where
    matches of every length and overlaps abound."""
    from numpy.lib.stride_tricks import sliding_window_view

    def reference(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
        for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
            hits = np.flatnonzero((sliding_window_view(tokens[:-1], n) == tokens[-n:]).all(1))
            if hits.size:
                return tokens[hits[-1] + n:hits[-1] + n + k].tolist()
        return []

    rng = np.random.default_rng(1)
    for _ in range(3000):
        tokens = rng.integers(0, rng.integers(1, 6), rng.integers(1, 40))
        low = int(rng.integers(1, 4))
        high, k = int(rng.integers(low, 7)), int(rng.integers(1, 5))
        assert propose_ngram(tokens, low, high, k) == reference(tokens, low, high, k), tokens


@pytest.mark.parametrize("value, message", [
    ('{"method": "eagle", "num_speculative_tokens": 2}', "EAGLE"),
    ('{"method": "ngram"}', "needs num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', r"\[1, 32\]"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, '
     '"prompt_lookup_max": 2}', "prompt_lookup_min <= prompt_lookup_max"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "needs a model"),
    ('{"num_speculative_tokens": 2, "bogus": 1}', r"unknown keys \['bogus'\]"),
    ("{not json", "not valid JSON"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "min_acceptance_rate": "high"}',
     "min_acceptance_rate must be in"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": "4"}',
     "disable_by_batch_size must be at least 1"),
])
def test_bad_configs_are_refused_by_name(value, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(value)


def test_min_acceptance_rate_defaults_by_method():
    """A draft model's tokens cost far more to propose than prompt lookup's, so it needs a
    higher acceptance rate to pay; a given rate overrides either."""
    ngram = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2})
    draft = SpeculativeConfig.parse({"model": "d", "num_speculative_tokens": 2})
    assert ngram.min_acceptance_rate < draft.min_acceptance_rate
    assert SpeculativeConfig.parse({"model": "d", "num_speculative_tokens": 2,
                                    "min_acceptance_rate": 0}).min_acceptance_rate == 0


def test_vllm_spellings():
    assert SpeculativeConfig.parse({"model": "[ngram]", "num_speculative_tokens": 3,
                                    "prompt_lookup_max": 4}).prompt_lookup_min == 4
    assert SpeculativeConfig.parse({"model": "d", "num_speculative_tokens": 3}).method == \
        "draft_model"
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}'
                                   ).prompt_lookup_max == 5


def test_a_draft_with_another_vocabulary_is_refused(checkpoint):
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        LLM(dtype="float32", kv_cache_memory="16MiB", speculative_config={
            "model": str(checkpoint("llama-gqa")), "num_speculative_tokens": 2})


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_structured_output_under_speculation(method, plain, monkeypatch):
    """Drafts are checked against the grammar at every position they occupy: constrained
    greedy requests give the tokens they give without speculation, also when the masks at
    draft positions come too late for their step (the request then waits, drafts kept,
    and verifies them once its masks are in), and sampled ones still parse."""
    import json
    import time

    from kvflow import StructuredOutputsParams
    from kvflow.structured_output.matcher import RequestGrammar

    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}},
        "required": ["name", "tags"], "additionalProperties": False}
    constrained = StructuredOutputsParams(json=schema)
    greedy = SamplingParams(temperature=0, max_tokens=60, structured_outputs=constrained)
    llm = LLM(dtype="float32", kv_cache_memory="64MiB", speculative_config=_config(method, 3))
    expected = _tokens(plain, greedy)
    assert _tokens(llm, greedy) == expected
    fill = RequestGrammar.fill_masks

    def late_with_drafts(grammar, pointer, row_bytes, draft_token_ids):
        if draft_token_ids:
            time.sleep(0.02)
        fill(grammar, pointer, row_bytes, draft_token_ids)

    monkeypatch.setattr(RequestGrammar, "fill_masks", late_with_drafts)
    assert _tokens(llm, greedy) == expected
    monkeypatch.undo()
    hot = SamplingParams(temperature=1.0, seed=3, max_tokens=60, structured_outputs=constrained)
    for output in llm.generate(PROMPTS, hot, use_tqdm=False):
        value = json.loads(output.outputs[0].text)
        assert set(value) == {"name", "tags"} and set(value["tags"]) <= {"a", "b", "c"}
    assert llm.engine.stats.spec_decode.num_drafts > 0 and _no_leaks(llm)
