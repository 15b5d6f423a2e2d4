"""Gemma 2, Gemma 3 and Phi-3 through the registry: the same tokens as transformers, with
what sets each family apart exercised (soft caps, sandwich norms, windows, per-layer RoPE,
LongRoPE on both sides of its switch, partial rotary, fused checkpoints), and every engine
feature kept on them. The mixture-of-experts families share the bf16 check here; their
other tests are in test_moe.py."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from checkpoints import MOE_VARIANTS
from conftest import (assert_greedy_matches, assert_no_leak, chunked_and_preempted,
                      generate_greedy, hf_greedy, random_prompts)
from kvflow import LLM, SamplingParams, StructuredOutputsParams

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
FAMILIES = ["gemma2", "gemma3", "phi3"]


@pytest.fixture(scope="module")
def references(checkpoint, hf_model):
    """Per family: its checkpoint, prompts past its window (and past Phi-3's LongRoPE
    switch at 32 positions), and transformers' greedy tokens."""
    made = {}
    for family in FAMILIES:
        path = checkpoint(family)
        prompts = random_prompts(6, seed=5, low=33, high=60)
        made[family] = path, prompts, [hf_greedy(hf_model(path), p, MAX_TOKENS)
                                       for p in prompts]
    return made


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["native", "eager"])
def test_greedy_matches_transformers(family, enforce_eager, references):
    path, prompts, reference = references[family]
    llm, tokens = generate_greedy(path, prompts, GREEDY, enforce_eager=enforce_eager)
    assert_greedy_matches(tokens, reference, MAX_TOKENS)
    assert len({tuple(t) for t in tokens}) > 1
    assert_no_leak(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_preemption(family, references):
    path, prompts, reference = references[family]
    llm, tokens = chunked_and_preempted(path, prompts, GREEDY)
    assert_greedy_matches(tokens, reference, MAX_TOKENS)
    assert_no_leak(llm)


def test_each_family_feature_changes_the_tokens(checkpoint, references):
    """The features the checkpoints exercise are not idle: without Gemma 2's attention cap,
    Gemma 3's window or Phi-3's long factors the tokens differ."""
    for family, override in [("gemma2", {"attn_logit_softcapping": None}),
                             ("gemma3", {"sliding_window": 4096})]:
        path, prompts, reference = references[family]
        _, tokens = generate_greedy(checkpoint(family, **override), prompts, GREEDY)
        assert tokens != reference, family
    path, prompts, reference = references["phi3"]
    # A context of 32 keeps the short factors: prompts are cut to fit it.
    short = [p[:20] for p in prompts]
    eight = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    _, long_tokens = generate_greedy(path, short, eight)
    _, short_tokens = generate_greedy(path, short, eight, max_model_len=32)
    assert long_tokens != short_tokens


def test_longrope_short_factors_match_transformers_in_a_short_context(checkpoint, hf_model):
    """With max_model_len within the trained length, the short factors, as transformers
    uses them for sequences that short."""
    path = checkpoint("phi3")
    prompts = random_prompts(6, seed=6, low=3, high=20)
    _, tokens = generate_greedy(path, prompts,
                                SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                max_model_len=32)
    assert_greedy_matches(tokens, [hf_greedy(hf_model(path), p, 10) for p in prompts], 10)


@pytest.mark.parametrize("params", [
    dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
         original_max_position_embeddings=4096, rope_theta=150000.0),  # gpt-oss's
    dict(factor=4.0, original_max_position_embeddings=32768, rope_theta=1e6),  # Qwen's
    dict(factor=40.0, mscale=1.0, mscale_all_dim=0.707, beta_fast=24, beta_slow=2,
         original_max_position_embeddings=4096, rope_theta=10000.0),  # DeepSeek's mscales
], ids=["gpt-oss", "qwen", "mscale"])
def test_yarn_frequencies_and_attention_factor_are_transformers(params):
    """YaRN's inverse frequencies and cos/sin factor, bit for bit transformers' own."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from kvflow.layers.rotary import inverse_frequencies
    from kvflow.models.config import read_rope

    hf = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=8192,
                     rope_parameters={"rope_type": "yarn", **params})
    expected, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    rope = read_rope(hf.rope_parameters, hf)
    assert rope.attention_factor == factor
    assert torch.equal(inverse_frequencies(64, rope, 8192), expected)


def test_gemma2_final_soft_cap_in_logprobs(references, hf_model):
    """The final cap does not move an argmax, so it is checked where it shows: the
    prompt's logprobs equal transformers' log-softmax of its capped logits."""
    path, prompts, _ = references["gemma2"]
    prompt = prompts[0]
    llm, _ = generate_greedy(path, [prompt], GREEDY)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt])).logits[0].float()
    assert logits.abs().max() < 20.0  # capped at final_logit_softcapping
    expected = torch.log_softmax(logits, dim=-1)
    for position, entry in enumerate(out.prompt_logprobs[1:]):
        token = prompt[position + 1]
        assert entry[token].logprob == pytest.approx(expected[position, token].item(),
                                                     abs=1e-4)


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_VARIANTS])
def test_bfloat16_as_close_as_transformers_bfloat16(family, checkpoint, hf_model):
    """bf16 logprobs of the top 20 tokens at the last prompt position stray from the
    float32 reference at most 1.5x as far (+0.02) as transformers' own bf16 run does. The
    random test weights amplify rounding (transformers' bf16 strays 0.1 to 0.6 here), so a
    fixed bound would be either loose or flaky; each side rounds at other points."""
    from transformers import AutoModelForCausalLM

    path = checkpoint(family)
    prompt = random_prompts(1, seed=7, low=40, high=41)[0]
    reference = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = (hf_model(path) if dtype == torch.float32 else
                 AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval())
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1].float()
        reference[dtype] = torch.log_softmax(logits, dim=-1)
    llm = LLM(str(path), dtype="bfloat16", device="cpu", kv_cache_memory="16MiB")
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=1, logprobs=20), use_tqdm=False)[0]
    top = out.outputs[0].logprobs[0]
    exact = reference[torch.float32]
    ours = max(abs(e.logprob - exact[t].item()) for t, e in top.items())
    theirs = max(abs(reference[torch.bfloat16][t].item() - exact[t].item()) for t in top)
    assert ours <= 1.5 * theirs + 0.02, (ours, theirs)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_quantized_at_load(family, references):
    """int8 at load on each family (Phi-3's fused checkpoint layers quantized whole)."""
    path, prompts, _ = references[family]
    llm, tokens = generate_greedy(path, prompts[:3], GREEDY, quantization="int8")
    assert all(len(t) == MAX_TOKENS for t in tokens)
    assert_no_leak(llm)


def test_structured_output_and_prefix_cache(references):
    path, prompts, _ = references["gemma2"]
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="16MiB",
              enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=12,
                            structured_outputs=StructuredOutputsParams(
                                choice=["yes", "no", "maybe"]))
    first = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0]
    assert first.outputs[0].text in ("yes", "no", "maybe")
    assert second.outputs[0].text == first.outputs[0].text
    assert second.num_cached_tokens > 0


def test_draft_of_another_family_runs_the_targets_kernels(checkpoint):
    """A Gemma 2 draft (the same tokenizer) for a Llama target is built by the engine's
    builder: in batch-invariant mode every linear of the draft runs the GEMV at any size."""
    from kvflow.layers.linear import Linear

    llm = LLM(str(checkpoint("llama-gqa")), dtype="float32", device="cpu",
              kv_cache_memory="16MiB", batch_invariant=True,
              speculative_config={"model": str(checkpoint("gemma2")),
                                  "num_speculative_tokens": 2})
    draft = llm.engine.runner.speculator.proposer.model
    assert type(draft).__name__ == "GemmaForCausalLM"
    plans = [m.plan for m in draft.modules() if isinstance(m, Linear)]
    assert plans and all(p is not None and p.gemv_max_rows > 10**9 for p in plans)
    prompts = random_prompts(3, seed=8)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    _, plain = generate_greedy(checkpoint("llama-gqa"), prompts, GREEDY, batch_invariant=True)
    assert [o.outputs[0].token_ids for o in outputs] == plain


@pytest.mark.parametrize("variant,override,message", [
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    ("phi3", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    ("llama-gqa", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unimplemented_config_fields_are_refused_by_name(variant, override, message,
                                                         checkpoint):
    with pytest.raises(ValueError, match=message):
        LLM(str(checkpoint(variant, **override)), device="cpu", kv_cache_memory="16MiB")


def test_unknown_architecture_is_refused(checkpoint, tmp_path):
    import json
    import shutil

    path = tmp_path / "unknown"
    shutil.copytree(checkpoint("llama-gqa"), path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["Gemma3ForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'Gemma3ForConditionalGeneration' is not supported"
                                         ".*Gemma2ForCausalLM"):
        LLM(str(path), device="cpu", kv_cache_memory="16MiB")


def test_every_layer_with_arithmetic_declares_its_native_kernel():
    """Norms, activations, rotaries and expert layers say whether they take a native
    kernel (linear layers, the router among them, are planned by measurement): a new one
    cannot be skipped silently."""
    import kvflow.layers.activation
    import kvflow.layers.moe
    import kvflow.layers.norm
    import kvflow.layers.rotary
    from kvflow.layers.linear import Linear
    from kvflow.layers.native import NativeKernelHook

    for module in (kvflow.layers.activation, kvflow.layers.norm, kvflow.layers.rotary,
                   kvflow.layers.moe):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (issubclass(cls, nn.Module) and not issubclass(cls, Linear)
                    and cls.__module__ == module.__name__):
                assert issubclass(cls, NativeKernelHook), cls
