"""Sampling parameters end to end, and their validation."""
from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from kvflow import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(checkpoint):
    # Batch-invariant: tokens alone and inside batches are compared exactly.
    return LLM(str(checkpoint("llama-gqa")), dtype="float32", device="cpu",
               kv_cache_memory="8MiB", batch_invariant=True)


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def _tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(_ids(prompts), params, use_tqdm=False)]


def test_seeded_sampling_independent_of_batch(llm):
    prompts = random_prompts(6, seed=8)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16,
                            ignore_eos=True)
    alone = _tokens(llm, prompts[:1], seeded)[0]
    others = SamplingParams(temperature=1.2, max_tokens=16, ignore_eos=True)
    batched = llm.generate(_ids(prompts), [seeded] + [others] * 5, use_tqdm=False)
    assert batched[0].outputs[0].token_ids == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99,
                                    max_tokens=16, ignore_eos=True)
    assert _tokens(llm, prompts[:1], different_seed)[0] != alone


def test_top_k_one_is_greedy(llm):
    prompts = random_prompts(3, seed=9)
    greedy = _tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    top1 = _tokens(llm, prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=10,
                                                ignore_eos=True))
    assert greedy == top1


def test_n_samples_are_distinct(llm):
    prompt = random_prompts(1, seed=10)
    out = llm.generate(_ids(prompt), SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12,
                                                    ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 4
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in out.outputs)


def test_logit_bias_forces_a_token(llm):
    prompts = random_prompts(2, seed=11)
    out = _tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                               logit_bias={42: 100.0}))
    assert out == [[42] * 5, [42] * 5]


def test_stop_token_ids_and_eos(llm):
    prompt = random_prompts(1, seed=12)
    free = _tokens(llm, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop_at = free[4]
    out = llm.generate(_ids(prompt), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                    stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    cut = free.index(stop_at) + 1
    assert out.token_ids == free[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # EOS (token 0) forced by logit_bias ends the request unless ignore_eos is set.
    eos = SamplingParams(temperature=0, max_tokens=6, logit_bias={0: 100.0})
    out = llm.generate(_ids(prompt), eos, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [0] and out.finish_reason == "stop" and out.stop_reason is None
    eos.ignore_eos = True
    out = llm.generate(_ids(prompt), eos, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [0] * 6 and out.finish_reason == "length"


def test_min_tokens_holds_back_eos(llm):
    prompt = random_prompts(1, seed=13)
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=4, logit_bias={0: 100.0})
    out = llm.generate(_ids(prompt), params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == 0 and 0 not in out.token_ids[:4]
    assert out.finish_reason == "stop"


def test_stop_strings_cut_text(llm):
    prompt = random_prompts(1, seed=14)
    free = llm.generate(_ids(prompt), SamplingParams(temperature=0, max_tokens=16,
                                                     ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    stop = text[5:8]
    assert len(stop) == 3
    cut = llm.generate(_ids(prompt), SamplingParams(temperature=0, max_tokens=16,
                                                    ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == text[:text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(_ids(prompt), SamplingParams(temperature=0, max_tokens=16,
                                                     ignore_eos=True, stop=stop,
                                                     include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_penalties_change_output(llm):
    prompts = random_prompts(2, seed=15)
    plain = _tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for params in (SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                  repetition_penalty=2.0),
                   SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                  presence_penalty=2.0),
                   SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                  frequency_penalty=2.0)):
        assert _tokens(llm, prompts, params) != plain


def test_penalty_arithmetic():
    import torch

    from kvflow.outputs import ScheduledRequest
    from kvflow.sampling.sampler import Sampler, prepare_sampling

    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25)
    request = ScheduledRequest(req_id="r", token_ids=[1], num_computed_tokens=2, block_ids=[1],
                               sample=True, sampling_params=params, prompt_token_ids=[1, 2],
                               output_token_ids=[3, 3], stop_token_ids=frozenset())
    batch = prepare_sampling([request], {}, vocab_size=5, device=torch.device("cpu"))
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0, 3.0]])
    adjusted = Sampler.adjust(logits, batch)
    # token 1 in prompt: 2/2; token 2 in prompt: -2*2; token 3 output twice: 4/2 - 0.5 - 2*0.25
    assert adjusted.tolist() == [[1.0, 1.0, -4.0, 1.0, 3.0]]
    tokens, _ = Sampler(torch.Generator())(logits, batch)
    assert tokens.tolist() == [4]


def test_logit_bias_and_min_tokens_bans_per_row_and_cheap_per_step():
    import time

    from kvflow.outputs import ScheduledRequest
    from kvflow.sampling.sampler import Sampler, prepare_sampling

    vocab = 4096
    bias = {token: (token % 7) - 3.0 for token in range(0, vocab, 4)}  # 1,024 entries
    parent = SamplingParams(n=64, temperature=0, logit_bias=bias, min_tokens=2,
                            stop_token_ids=list(range(1, vocab, 4)))
    stops = frozenset(parent.stop_token_ids)

    def row(i: int, done: int, params: SamplingParams) -> ScheduledRequest:
        return ScheduledRequest(req_id=f"r{i}", token_ids=[1], num_computed_tokens=3,
                                block_ids=[0], sample=True, sampling_params=params,
                                prompt_token_ids=[1, 2, 3], output_token_ids=[5] * done,
                                stop_token_ids=stops)

    plain = SamplingParams(temperature=0)
    # Rows 0-62 are samples of one request, still under min_tokens; row 63 is past it and
    # row 64 has neither bias nor bans.
    requests = [row(i, 0, parent.for_sample(i)) for i in range(63)]
    requests += [row(63, 2, parent.for_sample(63)), row(64, 0, plain)]
    batch = prepare_sampling(requests, {}, vocab_size=vocab, device=torch.device("cpu"))
    adjusted = Sampler.adjust(torch.zeros(len(requests), vocab), batch)
    expected = torch.zeros(vocab)
    expected[list(bias)] = torch.tensor(list(bias.values()))
    banned = expected.clone()
    banned[sorted(stops)] = -float("inf")
    assert torch.equal(adjusted[0], banned) and torch.equal(adjusted[62], banned)
    assert torch.equal(adjusted[63], expected) and not adjusted[64].any()
    assert requests[1].sampling_params.logit_bias_tensors is parent.logit_bias_tensors

    # Built from per-request tensors, not a Python loop per entry: about 1 ms here, where
    # the loop took about 190 ms (the bound leaves room for a slow machine).
    start = time.perf_counter()
    for _ in range(5):
        prepare_sampling(requests, {}, vocab_size=vocab, device=torch.device("cpu"))
    assert (time.perf_counter() - start) / 5 < 0.05


def test_logit_bias_and_stop_token_ids_are_capped():
    from kvflow.sampling_params import MAX_LOGIT_BIAS_TOKENS, MAX_STOP_TOKEN_IDS

    with pytest.raises(ValueError, match="logit_bias has"):
        SamplingParams(logit_bias={t: 1.0 for t in range(MAX_LOGIT_BIAS_TOKENS + 1)})
    with pytest.raises(ValueError, match="stop_token_ids has"):
        SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("n", 0), ("max_tokens", -1),
    ("truncate_prompt_tokens", 0), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("repetition_penalty", 1e-30), ("repetition_penalty", 1e4),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("min_tokens", -1),
    ("logprobs", -2), ("prompt_logprobs", -3), ("stop", [""]), ("logit_bias", {1: 200}),
    ("temperature", "hot"), ("n", 1.5),
])
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0] if field != "stop" else "stop"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_an_error():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_stop_token_text_is_left_out(llm):
    prompt = random_prompts(1, seed=16)
    free = _tokens(llm, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop_at = free[4]
    cut = free.index(stop_at)

    def text(**options):
        return llm.generate(_ids(prompt), SamplingParams(temperature=0, ignore_eos=True,
                                                         **options),
                            use_tqdm=False)[0].outputs[0].text

    assert text(max_tokens=12, stop_token_ids=[stop_at]) == text(max_tokens=cut)
    assert text(max_tokens=12, stop_token_ids=[stop_at],
                include_stop_str_in_output=True) == text(max_tokens=cut + 1)


def test_stop_string_on_the_last_allowed_token_is_a_stop(llm):
    prompt = random_prompts(1, seed=17)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    texts = [llm.generate(_ids(prompt), SamplingParams(temperature=0, max_tokens=k,
                                                       ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].text for k in range(1, 17)]
    assert texts[-1] == llm.generate(_ids(prompt), greedy, use_tqdm=False)[0].outputs[0].text
    # A length k whose last character first appears in the k-th token's text.
    k = next(k for k in range(16, 1, -1) if texts[k - 1] and texts[k - 1] != texts[k - 2]
             and texts[k - 1][-1] not in texts[k - 1][:-1])
    stop = texts[k - 1][-1]
    out = llm.generate(_ids(prompt), SamplingParams(temperature=0, max_tokens=k, stop=stop,
                                                    ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == texts[k - 1][:-1]
    assert out.finish_reason == "stop" and out.stop_reason == stop


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("repetition_penalty", float("inf")),
    ("top_p", float("nan")), ("seed", -1), ("seed", 2**64),
])
def test_non_finite_and_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


def test_seed_range_accounts_for_n():
    SamplingParams(seed=2**64 - 1)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64 - 1, n=2)


def test_huge_top_k_is_the_whole_vocabulary(llm):
    prompts = random_prompts(2, seed=18)
    params = dict(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    assert (_tokens(llm, prompts, SamplingParams(top_k=2**70, **params))
            == _tokens(llm, prompts, SamplingParams(**params)))


def test_greedy_fast_path_picks_the_first_largest_logit_in_the_model_dtype():
    """The all-greedy path skips the float copy; its tokens must equal argmax of the float
    logits, ties going to the lowest id, and a logit_bias must still take the full path."""
    from kvflow.sampling.sampler import Sampler, SamplingBatch

    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0)).bfloat16()
    logits[2, 5] = logits[2, 900] = 60.0  # a tie
    rows = logits.shape[0]

    def batch(**overrides):
        fields = dict(temperature=torch.zeros(rows), all_greedy=True, top_k=None, top_p=None,
                      min_p=None, generators={}, penalties=None, logit_bias=None, banned=None,
                      allowed=None,
                      num_logprobs=[None] * rows)
        return SamplingBatch(**{**fields, **overrides})

    sampler = Sampler(torch.Generator().manual_seed(0))
    tokens, entries = sampler(logits, batch())
    assert tokens.tolist() == logits.float().argmax(-1).tolist()
    assert tokens[2] == 5 and entries == [None] * rows
    bias = (torch.tensor([2]), torch.tensor([900]), torch.tensor([1.0]))
    biased, _ = sampler(logits, batch(logit_bias=bias))
    assert biased[2] == 900


def test_allowed_token_ids_and_bad_words(llm):
    prompts = random_prompts(2, seed=11)
    allowed = [7, 42, 99]
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=12, ignore_eos=True,
                            allowed_token_ids=allowed, n=2)
    for output in llm.generate(_ids(prompts), params, use_tqdm=False):
        for sample in output.outputs:
            assert set(sample.token_ids) <= set(allowed)
    # A bad word is never produced: ban the word greedy decoding would write first (from
    # a prompt whose first token is a whole word, not part of a character).
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokenizer = llm.get_tokenizer()
    candidates = _ids(random_prompts(12, seed=12))
    for prompt, output in zip(candidates, llm.generate(candidates, greedy, use_tqdm=False)):
        first = output.outputs[0]
        word = tokenizer.decode(first.token_ids[:1])
        if word.strip() and tokenizer.encode(word, add_special_tokens=False) == \
                first.token_ids[:1]:
            break
    else:
        pytest.fail("no prompt starts with a whole-word token")
    banned = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                            bad_words=[word.strip()])
    out = llm.generate([prompt], banned, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] != first.token_ids[0]
    for ids in banned.bad_words_token_ids:
        assert all(out.token_ids[i:i + len(ids)] != ids for i in range(len(out.token_ids)))


def test_bad_word_of_several_tokens_is_cut_at_its_last_token():
    from kvflow.sampling.sampler import _bad_word_ends

    words = [[5], [1, 2, 3]]
    assert _bad_word_ends(words, [9, 1, 2]).tolist() == [3, 5]
    assert _bad_word_ends(words, [1, 9]).tolist() == [5]
    assert _bad_word_ends(words, []).tolist() == [5]


def test_detokenize_false_logprobs_all_and_clone(checkpoint):
    path = str(checkpoint("llama-gqa"))
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory="8MiB", max_logprobs=-1)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, detokenize=False,
                            logprobs=-1)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0].outputs[0]
    assert out.text == "" and len(out.token_ids) == 3
    vocab = llm.engine.model_config.vocab_size
    assert all(len(entry) == vocab for entry in out.logprobs)
    copy = params.clone()
    assert copy == params and copy is not params
    capped = LLM(path, dtype="float32", device="cpu", kv_cache_memory="8MiB")
    with pytest.raises(ValueError, match="exceeds the server's max_logprobs=20"):
        capped.generate("x", SamplingParams(logprobs=-1), use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids entry"):
        capped.generate("x", SamplingParams(allowed_token_ids=[vocab]), use_tqdm=False)
    with pytest.raises(ValueError, match="lora_request"):
        capped.generate("x", lora_request=object())


def test_prompt_typed_dicts():
    from kvflow.inputs import TextPrompt, TokensPrompt

    assert TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}
    assert TextPrompt(prompt="hi", cache_salt="a") == {"prompt": "hi", "cache_salt": "a"}


_ADJUSTMENTS = {
    "none": {},
    "min_tokens": {"min_tokens": 4},
    "bad_words": {"bad_words": ["x"]},
    "logit_bias": {"logit_bias": {3: 5.0}},
    "allowed_token_ids": {"allowed_token_ids": [2, 3, 7]},
    "penalties": {"repetition_penalty": 1.3, "presence_penalty": 0.5,
                  "frequency_penalty": 0.2},
    "grammar": {},
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("adjustment", sorted(_ADJUSTMENTS))
@pytest.mark.parametrize("mode", ["greedy", "greedy-logprobs", "sampled", "spec-greedy",
                                  "spec-sampled"])
def test_every_logits_adjustment_in_every_dtype_and_path(dtype, adjustment, mode):
    """Logits come from the model in its dtype (the greedy fast path keeps them so); every
    adjustment must work on them and forbid what it forbids, greedy or sampled, verifying
    drafts or not. A bf16 greedy request with min_tokens once failed every step."""
    from kvflow.outputs import ScheduledRequest
    from kvflow.sampling.rejection_sampler import RejectionSampler
    from kvflow.sampling.sampler import Sampler, prepare_sampling, sampling_rows

    vocab, stop = 16, 5
    sampled = mode.endswith("sampled")
    params = SamplingParams(temperature=0.8 if sampled else 0, seed=3 if sampled else None,
                            logprobs=2 if mode == "greedy-logprobs" else None,
                            **_ADJUSTMENTS[adjustment])
    params.bad_words_token_ids = [[stop]] if adjustment == "bad_words" else []
    drafts = [stop, 1] if mode.startswith("spec") else []
    request = ScheduledRequest(req_id="r", token_ids=[1], num_computed_tokens=3, block_ids=[0],
                               sample=True, sampling_params=params, prompt_token_ids=[1, 2, 3],
                               output_token_ids=[2], stop_token_ids=frozenset({stop}),
                               draft_token_ids=drafts)
    rows = sampling_rows(request) if drafts else [request]
    generators = {"r": torch.Generator().manual_seed(3)} if sampled else {}
    batch = prepare_sampling(rows, generators, vocab_size=vocab, device=torch.device("cpu"))
    if adjustment == "grammar":  # a grammar that forbids the stop token in every row
        mask = torch.full((len(rows), 1), (1 << vocab) - 1 - (1 << stop), dtype=torch.int32)
        batch.grammar = (torch.arange(len(rows)), mask)
    # The stop token leads every row by far: only the adjustments keep it out.
    logits = torch.zeros(len(rows), vocab)
    logits[:, stop] = 20.0
    logits[:, 3] = 10.0
    logits = logits.to(dtype)
    sampler = Sampler(torch.Generator().manual_seed(0))
    if drafts:
        tokens, entries = RejectionSampler(sampler)(logits, batch, [drafts])
        tokens = tokens[0]
    else:
        sampled_ids, entries = sampler(logits, batch)
        tokens = sampled_ids.tolist()
    forbids_stop = adjustment in ("min_tokens", "bad_words", "allowed_token_ids", "grammar")
    assert all(0 <= t < vocab for t in tokens)
    if forbids_stop:
        assert stop not in tokens
    elif not sampled:
        assert tokens[-1] == stop and tokens[:-1] == drafts[:len(tokens) - 1]
    assert (entries[0] is not None) == (mode == "greedy-logprobs")
