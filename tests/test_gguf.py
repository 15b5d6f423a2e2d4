"""GGUF files (kvflow/models/gguf/): tiny random checkpoints of every family kvflow reads
from GGUF (Llama, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, and the mixtures of experts
Qwen3-MoE, Qwen2-MoE, Mixtral and OLMoE) saved by transformers and written as GGUF by the
gguf package's writer (kvflow/bench/gguf_export.py, laid out as llama.cpp's converter and
llama-quantize lay them out), loaded back by kvflow.

The gguf package quantizes Q8_0, Q4_0 and Q5_0 itself; it has no K-quant quantizer, so
kvflow/bench/gguf_quants.py writes Q4_K, Q5_K and Q6_K blocks with its own round-to-nearest
search, and every check here reads them back through the gguf package's dequantizers."""
from __future__ import annotations

import json
import logging
import re
import struct
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import load_file

from checkpoints import MOE_VARIANTS
from conftest import checkpoint_with, random_prompts, rewrite_gguf
from kvflow import LLM, SamplingParams
from kvflow.bench.gguf_quants import quantize
from kvflow.models.config import ModelConfig
from kvflow.models.gguf import GgufFile
from kvflow.models.gguf.weights import plan_gguf, unpack_q4_0, unpack_q4_1, unpack_q4_k
from kvflow.models.llama import LlamaForCausalLM
from kvflow.quantization.int4 import dequantize_int4, pack_int4
from kvflow.quantization.int8 import quantize_int8


# Hidden and intermediate sizes whole numbers of Q4_K's 256-column super-blocks; with three
# layers, Q4_K_M writes layer 2's attn_v and ffn_down as Q6_K.
K_QUANT_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3)
# What a GGUF file can carry of a test checkpoint: llama.cpp stores no query_pre_attn_scalar
# and scales Gemma 2's queries by 1/sqrt(head_dim) (test_gemma_attention_scale_and_windows_
# are_llama_cpps); its qwen3moe and qwen2moe have experts in every layer (their tensor names
# have no dense MLP), its converter writes no window for Mixtral (as for any llama), and
# its gpt-oss fixes the SwiGLU's limit at 7.
CARRIED = {"gemma2": dict(query_pre_attn_scalar=16), "qwen3-moe": dict(mlp_only_layers=[]),
           "qwen2-moe": dict(decoder_sparse_step=1), "mixtral": dict(sliding_window=None),
           "gpt-oss": dict(swiglu_limit=7.0)}


def _k_quant_shape(variant: str) -> dict:
    """K_QUANT_SHAPE for a variant, keeping the layer count Gemma's layer_types fix and
    the head size Phi-3's four LongRoPE factors fit."""
    shape = {"gemma2": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4),
             "phi3": dict(K_QUANT_SHAPE, num_attention_heads=16)}
    shape["gemma3"] = shape["gemma2"]
    return {**shape.get(variant, K_QUANT_SHAPE), **CARRIED.get(variant, {})}


def _random_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Blocks of random bytes, every bit pattern of nibbles and 6-bit scales included, with
    their fp16 scales set to finite values."""
    rng = np.random.default_rng(seed)
    block, width = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}[type_name]
    data = rng.integers(0, 256, (rows, cols // block, width), dtype=np.uint8)
    scales = 2 if type_name == "Q4_0" else 4  # d (and Q4_1's m, Q4_K's dmin) lead each block
    data[..., :scales] = (rng.random((rows, cols // block, scales // 2)) * 0.02).astype(
        np.float16).view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("type_name,unpack", [("Q4_0", unpack_q4_0), ("Q4_1", unpack_q4_1),
                                              ("Q4_K", unpack_q4_k)])
def test_int4_unpacking_is_bit_exact_against_the_gguf_dequantizer(type_name, unpack):
    rows, cols = 6, 512
    data = _random_blocks(type_name, rows, cols, seed=0)
    q, scale, offset = unpack(data, rows, cols)
    assert q.shape == (rows, cols) and scale.shape == offset.shape == (rows, cols // 32)
    expected = gguf_dequantize(data, GGMLQuantizationType[type_name])
    groups = q.float().view(rows, -1, 32) * scale[..., None] + offset[..., None]
    assert torch.equal(groups.view(rows, cols), torch.from_numpy(expected))
    # and through int4's packing, in a whole block of rows
    blocked = q.repeat(3, 1)[:16]
    assert torch.equal(dequantize_int4(pack_int4(blocked), scale.repeat(3, 1)[:16],
                                       offset.repeat(3, 1)[:16]),
                       torch.from_numpy(expected).repeat(3, 1)[:16])


def test_the_logged_change_of_rounded_scales_is_the_dequantized_difference():
    from kvflow.models.gguf.weights import _WeightChange

    q, scale, offset = unpack_q4_1(_random_blocks("Q4_1", 16, 256, seed=1), 16, 256)
    measured, analytic = _WeightChange(), _WeightChange()
    exact = dequantize_int4(pack_int4(q), scale, offset)
    measured.add(exact, dequantize_int4(pack_int4(q), scale.to(torch.bfloat16),
                                        offset.to(torch.bfloat16)))
    analytic.add_rounded_groups(q, scale, offset, torch.bfloat16)
    assert analytic.squared_error == pytest.approx(measured.squared_error, rel=1e-3)
    assert analytic.squared_norm == pytest.approx(measured.squared_norm, rel=1e-4)


def _planned(shapes, hf_names, config=None):
    tensors = {f"blk.0.{n}.weight": SimpleNamespace(
        name=f"blk.0.{n}.weight", hf_name=f"model.layers.0.{hf_names[n]}.weight",
        type_name="Q4_0", shape=shape) for n, shape in shapes.items()}
    return plan_gguf(SimpleNamespace(tensors=tensors), config, torch.bfloat16,
                     LlamaForCausalLM.packed_modules).methods


def test_q4_layers_that_do_not_make_whole_int4_blocks_are_dequantized():
    """int4 packs blocks of 16 rows by 64 columns, each part of a fused layer on its own:
    a fused layer with a part of 8 rows, or an input size of 32, is dequantized at load
    instead, also where the file stores the parts fused (Phi-3) and their sum would fit."""
    shapes = {"attn_q": (64, 128), "attn_k": (8, 128), "attn_v": (8, 128),
              "ffn_gate": (64, 128), "ffn_up": (64, 128), "ffn_down": (128, 32)}
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    assert _planned(shapes, hf) == {"model.layers.0.mlp.gate_up_proj": "int4"}
    fused = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
    for kv_heads, methods in ((1, {"model.layers.0.mlp.gate_up_proj": "int4"}),
                              (2, {"model.layers.0.mlp.gate_up_proj": "int4",
                                   "model.layers.0.self_attn.qkv_proj": "int4"})):
        config = SimpleNamespace(num_heads=6, num_kv_heads=kv_heads, head_dim=8,
                                 intermediate_size=64)
        rows = (6 + 2 * kv_heads) * 8  # 64 with k and v of 8 rows each, 80 with 16
        assert _planned({"attn_qkv": (rows, 128), "ffn_up": (128, 128)}, fused,
                        config) == methods


def test_the_k_quant_writers_make_blocks_the_gguf_package_reads_back_close():
    weight = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)
    for type_name, step in (("Q4_K", 1 / 15), ("Q5_K", 1 / 31), ("Q6_K", 1 / 63)):
        back = gguf_dequantize(quantize(weight, type_name), GGMLQuantizationType[type_name])
        groups = weight.reshape(4, -1, 32)
        spread = (groups.max(-1) - np.minimum(groups.min(-1), 0)).repeat(32, axis=1)
        # within about a rounding step of each group, plus the 6-bit rounding of its scale
        assert (np.abs(back - weight) <= 1.1 * step * spread + 0.02).all(), type_name


def _reader_tensor(path, name):
    return next(t for t in GGUFReader(path).tensors if t.name == name)


@pytest.mark.parametrize("recipe", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M"])
def test_every_parameter_is_what_the_gguf_dequantizer_reads(gguf_file, recipe):
    """Qwen2 (q/k/v biases, no q/k permutation): each loaded parameter, run in float32,
    against the gguf package's dequantization of its tensor; int8 layers hold that
    dequantization rounded to kvflow's per-row grid."""
    path, _ = gguf_file("qwen2", recipe, **K_QUANT_SHAPE)
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB")
    model = llm.engine.runner.model
    reader = GGUFReader(path)
    types = {t.tensor_type.name for t in reader.tensors}
    tensors = {t.name: torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type)).reshape(
        tuple(reversed(t.shape.tolist())))) for t in reader.tensors}
    assert torch.equal(model.model.embed_tokens.weight, tensors["token_embd.weight"])
    methods = set()
    for i, layer in enumerate(model.model.layers):
        for linear, names in ((layer.self_attn.qkv_proj, ("attn_q", "attn_k", "attn_v")),
                              (layer.mlp.gate_up_proj, ("ffn_gate", "ffn_up")),
                              (layer.mlp.down_proj, ("ffn_down",))):
            expected = torch.cat([tensors[f"blk.{i}.{n}.weight"] for n in names])
            method = type(linear.method).__name__
            methods.add(method)
            if method == "Int8LinearMethod":
                q, scale = quantize_int8(expected, torch.float32)
                assert torch.equal(linear.weight, q) and torch.equal(linear.weight_scale, scale)
            elif method == "Int4LinearMethod":
                assert torch.equal(linear.method.dequantize(linear), expected)
            else:
                assert torch.equal(linear.weight, expected)
        assert torch.equal(layer.self_attn.qkv_proj.bias, torch.cat(
            [tensors[f"blk.{i}.{n}.bias"] for n in ("attn_q", "attn_k", "attn_v")]))
        assert torch.equal(layer.input_layernorm.weight, tensors[f"blk.{i}.attn_norm.weight"])
    native = {"Q8_0": "Int8LinearMethod", "Q4_0": "Int4LinearMethod",
              "Q4_1": "Int4LinearMethod", "Q4_K_M": "Int4LinearMethod"}.get(recipe)
    if recipe == "Q4_K_M":  # layer 2's Q6_K v (in the fused qkv) and down run unquantized
        assert {"Q4_K", "Q6_K"} <= types and methods == {native, "UnquantizedLinearMethod"}
    else:
        assert methods == {native or "UnquantizedLinearMethod"}


_FLOAT_CASES = [(variant, recipe) for variant in ("llama-gqa", "llama-mha-tied-bias",
                                                 "llama3-rope", "llama-linear-rope", "qwen2",
                                                 "qwen3", *MOE_VARIANTS)
                for recipe in ("F32", "F16")] + [("gemma2", "F32"), ("gemma3", "F32"),
                                                 ("phi3", "F32")]


@pytest.mark.parametrize("variant,recipe", _FLOAT_CASES)
def test_float_gguf_gives_the_safetensors_tokens(gguf_file, variant, recipe):
    """Every parameter of the GGUF's model equals the checkpoint's it was written from
    (saved in the GGUF's float type), and so do greedy tokens and prompt logprobs, both run
    in float32: Llama's q/k rows (and their biases) come back from llama.cpp's order, Gemma's
    norms from the 1 + w the converter stored (bit for bit), Phi-3's fused layers whole,
    the RoPE of each family from its keys and tensors (Llama 3.1's rope_freqs, Gemma 3's
    local and global bases, Phi-3's LongRoPE factors and partial rotary), the experts from
    their stacked ffn_*_exps (Mixtral's q/k rows from llama.cpp's order too), Qwen2-MoE's
    shared expert and its gate, OLMoE's q/k norms across all heads."""
    dtype = {"F32": "float32", "F16": "float16"}[recipe]
    path, source = gguf_file(variant, recipe, dtype=dtype, **CARRIED.get(variant, {}))
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, seed=3)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=0)
    results, parameters = [], []
    for model in (source, path):
        llm = LLM(str(model), dtype="float32", device="cpu", kv_cache_memory="8MiB")
        results.append(llm.generate(prompts, params, use_tqdm=False))
        parameters.append(dict(llm.engine.runner.model.named_parameters()))
    assert parameters[0].keys() == parameters[1].keys()
    assert [name for name, value in parameters[0].items()
            if not torch.equal(value, parameters[1][name])] == []
    for expected, actual in zip(*results):
        assert actual.outputs[0].token_ids == expected.outputs[0].token_ids
        for e, a in zip(expected.prompt_logprobs[1:], actual.prompt_logprobs[1:]):
            assert next(iter(a.values())).logprob == pytest.approx(
                next(iter(e.values())).logprob, abs=1e-4)


def _dequantized_reference(gguf_path, source, out, plan=None):
    """The source checkpoint with every matrix replaced by what the GGUF's type makes of it
    (quantized and dequantized by the gguf package), computed from the source's own rows:
    blocks run along rows, so llama.cpp's q/k row order does not change them, and an
    expert's matrix comes out as its rows of the stacked tensor do. Tensors are found by
    the names the gguf package's map gives them, as the converter finds them (an expert's
    by its stack's). With the file's plan (plan_gguf), matrices of the layers it runs as
    int8 are what kvflow holds: rounded again to int8's per-row grid."""
    import gguf

    reader = GGUFReader(gguf_path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    arch = reader.get_field("general.architecture").contents()
    weights = load_file(str(source / "model.safetensors"))
    names = gguf.get_tensor_name_map({n: a for a, n in gguf.MODEL_ARCH_NAMES.items()}[arch],
                                     len({k.split(".")[2] for k in weights if ".layers." in k}))
    for key, value in weights.items():
        name = names.get_name(re.sub(r"\.experts\.\d+\.", ".experts.", key),
                              try_suffixes=(".weight", ".bias"))
        if value.dim() == 2 and name in types:
            qtype = types[name]
            weights[key] = torch.from_numpy(gguf_dequantize(
                quantize(value.float().numpy(), qtype.name), qtype))
            if plan is not None and plan.method_of(key) == "int8":
                q, scale = quantize_int8(weights[key], torch.float32)
                weights[key] = q.float() * scale[:, None]
    return checkpoint_with(source, out, weights)


def _logprobs(model, **options) -> tuple[list[torch.Tensor], set[str]]:
    """(prompt logprobs of three prompts, the methods of the model's linear layers)."""
    from kvflow.layers.linear import Linear

    llm = LLM(str(model), dtype="float32", device="cpu", kv_cache_memory="8MiB", **options)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=5, low=20, high=30)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    methods = {type(m.method).__name__ for m in llm.engine.runner.model.modules()
               if isinstance(m, Linear)}
    return [torch.tensor([next(iter(e.values())).logprob for e in o.prompt_logprobs[1:]])
            for o in outputs], methods


@pytest.mark.parametrize("variant,recipe,tolerance,method,modes", [
    (variant, recipe, tolerance, method, (False, True)) for variant in ("llama-gqa", "qwen2")
    for recipe, tolerance, method in (("Q4_0", 1e-4, "Int4LinearMethod"),
                                      ("Q4_K_M", 1e-4, "Int4LinearMethod"),
                                      ("Q8_0", 0.25, "Int8LinearMethod"))] + [
    # Gemma 2's tied embedding in Q6_K; Gemma 3's layers 2 and 5 with a Q6_K attn_v;
    # Phi-3's fused attn_qkv in Q6_K on its last layer (dequantized) and in Q4_K on the
    # others, as its fused ffn_up (int4), and both fused layers int8. The eager kernels
    # are checked on the two above.
    ("gemma2", "Q4_0", 1e-4, "Int4LinearMethod", (False,)),
    ("gemma3", "Q4_K_M", 1e-4, "Int4LinearMethod", (False,)),
    ("phi3", "Q4_K_M", 1e-4, "Int4LinearMethod", (False,)),
    ("phi3", "Q8_0", 0.25, "Int8LinearMethod", (False,))],
    ids=lambda value: {(False, True): "native+eager", (False,): "native"}.get(value)
    if isinstance(value, tuple) else None)
def test_quantized_gguf_logits_match_the_dequantized_reference(gguf_file, tmp_path, variant,
                                                               recipe, tolerance, method, modes):
    """int4 layers (Q4_0, Q4_K) hold the file's weights exactly, so only summation order
    separates them from the dequantized reference; Q8_0 is rounded again to int8's per-row
    grid, which moves these amplified test weights' logprobs by about 0.1 on average."""
    path, source = gguf_file(variant, recipe, **_k_quant_shape(variant))
    reference, _ = _logprobs(_dequantized_reference(path, source, tmp_path / "reference"))
    for eager in modes:
        actual, methods = _logprobs(path, enforce_eager=eager)
        assert method in methods
        for a, r in zip(actual, reference):
            assert (a - r).abs().mean() < tolerance, (eager, (a - r).abs().mean())


def test_gpt_oss_mxfp4_file(gguf_file, tmp_path, caplog):
    """A gpt-oss file whose experts are MXFP4, as llama.cpp's converter writes OpenAI's
    checkpoints: each expert stack holds the values the gguf package dequantizes from it
    (with a warning: kvflow has no MXFP4 kernel), and the greedy tokens are those of the
    checkpoint rebuilt with those values in its own layout, gate and up interleaved."""
    path, source = gguf_file("gpt-oss", "MXFP4", **CARRIED["gpt-oss"])
    with caplog.at_level(logging.WARNING, logger="kvflow"):
        llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB")
    assert "GGUF MXFP4 experts (6 tensors" in caplog.text
    tensors = _dequantized_tensors(path)
    weights = load_file(str(source / "model.safetensors"))
    for i, layer in enumerate(llm.engine.runner.model.model.layers):
        gate, up, down = (tensors[f"blk.{i}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))
        assert gate[0] == up[0] == down[0] == "MXFP4"
        assert torch.equal(layer.mlp.experts.gate_up_proj, torch.cat([gate[1], up[1]], dim=1))
        assert torch.equal(layer.mlp.experts.down_proj, down[1])
        prefix = f"model.layers.{i}.mlp.experts"
        weights[f"{prefix}.gate_up_proj"] = torch.stack([gate[1], up[1]], dim=2).flatten(1, 2) \
            .transpose(1, 2).contiguous()
        weights[f"{prefix}.down_proj"] = down[1].transpose(1, 2).contiguous()
    reference = checkpoint_with(source, tmp_path / "reference", weights)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=7, low=20, high=40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reference_llm = LLM(str(reference), dtype="float32", device="cpu", kv_cache_memory="8MiB")
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in reference_llm.generate(prompts, params,
                                                                        use_tqdm=False)])


def _dequantized_tensors(path) -> dict[str, tuple[str, torch.Tensor]]:
    """Each tensor of a GGUF file: (its type, the gguf package's dequantization of it)."""
    return {t.name: (t.tensor_type.name, torch.from_numpy(np.array(gguf_dequantize(
        t.data, t.tensor_type))).reshape(tuple(reversed(t.shape.tolist()))))
            for t in GGUFReader(path).tensors}


# An expert layer's method by the type its gate, up and down stacks share.
_EXPERT_METHODS = {"Q8_0": "Int8ExpertMethod", "Q4_0": "Int4ExpertMethod",
                   "Q4_1": "Int4ExpertMethod", "Q4_K": "Int4ExpertMethod"}
# Experts 64 wide, so that down_proj's rows make int4's packing blocks of 64 columns (and
# Mixtral's, 48 wide, whole Q8_0 blocks).
_WIDE_EXPERTS = {"mixtral": dict(intermediate_size=64), "olmoe": dict(intermediate_size=64)}


# gpt-oss's checkpoints fuse gate and up (test_gpt_oss_mxfp4_file has its own reference).
@pytest.mark.parametrize("variant,recipe,shape,dequantized", [
    (variant, recipe, _WIDE_EXPERTS.get(variant, dict(moe_intermediate_size=64)), ())
    for recipe in ("Q8_0", "Q4_0") for variant in MOE_VARIANTS if variant != "gpt-oss"] + [
    ("qwen3-moe", "Q4_1", dict(moe_intermediate_size=64), ()),
    # Q4_K's super-blocks of 256 columns. Qwen3-MoE's 8 experts make Q4_K_M keep attn_k
    # and attn_v in Q8_0 (llama-quantize's rule for 8-expert models), so its fused qkv is
    # dequantized; its last layer's ffn_down_exps is Q6_K, so that expert layer is too.
    ("qwen3-moe", "Q4_K_M", dict(hidden_size=256, moe_intermediate_size=256), (2,)),
    # experts 32 wide: down_proj's rows are not whole int4 packing blocks
    ("olmoe", "Q4_0", {}, (0, 1))])
def test_quantized_moe_experts_load_into_expert_methods(gguf_file, tmp_path, caplog, variant,
                                                        recipe, shape, dequantized):
    """A quantized file's expert stacks load into kvflow's expert methods where a layer's
    three stacks share a type and fit its blocks: Q4_0/Q4_1/Q4_K as int4 holding each
    expert's weights exactly as the gguf package dequantizes its slice, Q8_0 as int8
    rounded again to its row's grid; another layer is dequantized, with a warning. Routers
    stay the file's F32. Logprobs, natively and eagerly, are the dequantized reference's to
    1e-4 (with the layers kvflow runs as int8 rounded again to int8's grid in the reference
    too: that rounding alone moves these test weights' logprobs by about 0.3 on average
    once it flips some tokens' experts), and greedy tokens through the native expert kernel
    are the reference's."""
    path, source = gguf_file(variant, recipe, **shape, **CARRIED.get(variant, {}))
    with caplog.at_level(logging.INFO, logger="kvflow"):
        llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB")
    tensors = _dequantized_tensors(path)
    for i, layer in enumerate(llm.engine.runner.model.model.layers):
        block = getattr(layer, layer.feed_forward_name)
        experts = block.experts
        gate, up, down, router = (tensors[f"blk.{i}.{name}.weight"] for name in (
            "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp"))
        if i in dequantized:
            method = "UnquantizedExpertMethod"
        else:
            (type_name,) = {gate[0], up[0], down[0]}
            method = _EXPERT_METHODS[type_name]
        assert type(experts.method).__name__ == method, i
        assert experts.plan is not None, i  # the native expert kernel runs it
        for e in range(experts.num_experts):
            for name, exact in (("gate_up_proj", torch.cat([gate[1][e], up[1][e]])),
                                ("down_proj", down[1][e])):
                if method == "Int8ExpertMethod":
                    q, scale = quantize_int8(exact, torch.float32)
                    exact = q.float() * scale[:, None]
                stored = experts.method.expert_weight(experts, name, e)
                assert torch.equal(stored, exact), (i, e, name)
        assert torch.equal(block.gate.weight, router[1]) and router[0] == "F32"
    if dequantized:
        assert re.search(rf"GGUF Q[\w, ]+ experts \({3 * len(dequantized)} tensors, [\d.]+ "
                         rf"GiB\) are dequantized to float32 at load", caplog.text)
    else:
        assert "are dequantized" not in caplog.text
    if recipe == "Q4_K_M":
        assert tensors["blk.0.attn_k.weight"][0] == tensors["blk.0.attn_v.weight"][0] == "Q8_0"
    if len(dequantized) < len(llm.engine.runner.model.model.layers):
        target = ("int8 experts per output channel" if recipe == "Q8_0"
                  else "int4 g32 experts (exact)")
        assert re.search(rf"GGUF Q\w+: \d+ tensor\(s\) -> {re.escape(target)}", caplog.text)
    model = llm.engine.runner.model
    plan = plan_gguf(GgufFile(path), model.config, torch.float32, model.packed_modules)
    reference_path = _dequantized_reference(path, source, tmp_path / "reference", plan)
    reference, _ = _logprobs(reference_path)
    for eager in (False, True):  # the native expert kernel, and each expert dequantized
        actual, _ = _logprobs(path, enforce_eager=eager)
        for a, r in zip(actual, reference):
            assert (a - r).abs().max() < 1e-4, (eager, (a - r).abs().max())
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=7, low=5, high=15)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference_llm = LLM(str(reference_path), dtype="float32", device="cpu",
                        kv_cache_memory="8MiB")
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in reference_llm.generate(prompts, params,
                                                                        use_tqdm=False)])


def test_bad_expert_counts_are_refused_by_name(gguf_file, tmp_path):
    path, _ = gguf_file("qwen3-moe", "F32", **CARRIED["qwen3-moe"])
    u32, text = GGUFValueType.UINT32, GGUFValueType.STRING
    cases = {
        "none": ({"qwen3moe.expert_count": (0, u32)},
                 "'qwen3moe.expert_count' is 0; kvflow takes 1 to 16,384"),
        "huge": ({"qwen3moe.expert_count": (2**32 - 1, u32)},
                 "'qwen3moe.expert_count' is 4,294,967,295; kvflow takes 1 to 16,384"),
        "text": ({"qwen3moe.expert_count": ("8", text)},
                 "'qwen3moe.expert_count' is '8', not an integer"),
        "used": ({"qwen3moe.expert_used_count": (9, u32)},
                 "'qwen3moe.expert_used_count' is 9; kvflow takes 1 to 8, as the file has 8 "
                 "experts"),
        # in range, but not what the tensors hold
        "count": ({"qwen3moe.expert_count": (16, u32)},
                  r"'blk\.0\.ffn_\w+\.weight' has shape \[8, .*\], the metadata implies "
                  r"\[16, "),
        "width": ({"qwen3moe.expert_feed_forward_length": (64, u32)},
                  r"'blk\.0\.ffn_\w+_exps\.weight' has shape \[8, .*\], the metadata "
                  r"implies \[8, .*64"),
    }
    for name, (metadata, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_pretrained(rewrite_gguf(path, tmp_path / f"{name}.gguf",
                                                     metadata=metadata))
    # A llama file is Mixtral's by its expert count: without one, its routers are strangers.
    mixtral, _ = gguf_file("mixtral", "F32", **CARRIED["mixtral"])
    assert ModelConfig.from_pretrained(mixtral).architecture == "MixtralForCausalLM"
    dense = rewrite_gguf(mixtral, tmp_path / "dense.gguf",
                         metadata={"llama.expert_count": (0, u32)})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_\w+\.weight' has no counterpart in "
                                         r"kvflow's llama model"):
        ModelConfig.from_pretrained(dense)


def _layout(path) -> tuple[dict, dict]:
    """A GGUF file's metadata (but the name and size label it gives the model) and, by
    name, each tensor's type, shape and bytes."""
    reader = GGUFReader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items()
                if not key.startswith(("GGUF.", "general.name", "general.size_label"))}
    return metadata, {t.name: (t.tensor_type.name, t.shape.tolist(), np.array(t.data).tobytes())
                      for t in reader.tensors}


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_moe_files_are_laid_out_as_llama_cpps_own(gguf_file, variant):
    """Where kvflow's benchmarks have built llama.cpp (kvflow/bench/llama_cpp.py): its
    converter's BF16 file of each MoE checkpoint holds the exporter's tensors, byte for
    byte, and its metadata (the exporter adds a head size to Mixtral's, as to every
    llama file it writes), and llama-quantize picks the exporter's type for every tensor
    of Q8_0, Q4_0 and Q4_K_M."""
    from kvflow.bench import llama_cpp

    if not (llama_cpp.quantize_binary().exists()
            and (llama_cpp.peer_dir() / "convert-deps" / "sentencepiece").exists()):
        pytest.skip("llama.cpp's converter and llama-quantize are not built here")
    ours, source = gguf_file(variant, "BF16", **CARRIED.get(variant, {}))
    theirs = llama_cpp.convert_to_gguf(source, ours.with_name(f"llama-cpp-{variant}-bf16.gguf"))
    (our_metadata, our_tensors), (metadata, tensors) = _layout(ours), _layout(theirs)
    assert tensors == our_tensors
    assert metadata == {key: our_metadata[key] for key in metadata}
    assert set(our_metadata) - set(metadata) <= {"llama.attention.key_length",
                                                 "llama.attention.value_length"}
    for recipe in ("Q8_0", "Q4_0", "Q4_K_M"):
        ours, _ = gguf_file(variant, recipe, **CARRIED.get(variant, {}))
        types = {name: t for name, (t, _, _) in _layout(ours)[1].items()}
        assert {name: t for name, (t, _, _) in _layout(
            llama_cpp.quantize_gguf(theirs, recipe))[1].items()} == types, recipe


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
                                     *MOE_VARIANTS])
def test_tokenizer_and_chat_template_come_from_the_file(gguf_file, variant):
    """The tokenizer the engine builds from a GGUF file (kvflow/models/gguf/tokenizer.py,
    through transformers' reading of each architecture's file, or for OLMoE's, whose
    config transformers cannot read, from the tokenizer metadata alone) encodes as the
    checkpoint's and renders its chat template."""
    from transformers import AutoTokenizer

    from kvflow.models.gguf.tokenizer import load_gguf_tokenizer

    path, source = gguf_file(variant, "F32", dtype="float32", **CARRIED.get(variant, {}))
    gguf_tokenizer = load_gguf_tokenizer(path)
    original = AutoTokenizer.from_pretrained(source)
    text = "def fibonacci(n):\n    return n <|user|>hello<|end|> world  é"
    assert gguf_tokenizer.encode(text) == original.encode(text)
    messages = [{"role": "user", "content": "hello"}]
    assert (gguf_tokenizer.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
            == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert gguf_tokenizer.eos_token == original.eos_token


@pytest.mark.parametrize("variant,layers", [("gemma2", 2), ("gemma2", 46), ("gemma3", 62)])
def test_gemma_attention_scale_and_windows_are_llama_cpps(checkpoint, tmp_path, variant,
                                                          layers):
    """A GGUF file stores no query_pre_attn_scalar and no window pattern: kvflow takes
    llama.cpp's (src/llama-model.cpp). Queries are scaled by 1/sqrt(head_dim), or on a
    27B model (46 layers of Gemma 2, 62 of Gemma 3) by 1/sqrt(hidden / heads), whatever
    the checkpoint said; every 2nd (Gemma 2) or 6th (Gemma 3) layer is global."""
    from kvflow.bench.gguf_export import export_gguf

    period = 2 if variant == "gemma2" else 6
    kinds = ["sliding_attention"] * (period - 1) + ["full_attention"]
    # hidden 48 over 3 heads is 16 per head where the heads are 32 wide; 24 is neither
    source = checkpoint(variant, num_hidden_layers=layers, hidden_size=48,
                        num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                        query_pre_attn_scalar=24,
                        layer_types=(kinds * layers)[:layers])
    config = ModelConfig.from_pretrained(export_gguf(source, tmp_path / "m.gguf", "F32"))
    assert ModelConfig.from_pretrained(source).attention_scale == 24 ** -0.5
    assert config.attention_scale == (16 if layers in (46, 62) else 32) ** -0.5
    assert config.sliding_windows == tuple(12 if i % period < period - 1 else None
                                           for i in range(layers))


def test_a_phi3_window_is_applied_to_every_layer(gguf_file):
    """llama.cpp ignores a phi3 file's sliding_window; kvflow applies it, as it and
    transformers do for the checkpoint the file was written from."""
    path, source = gguf_file("phi3", "F32", sliding_window=24)
    assert ModelConfig.from_pretrained(path).sliding_windows == (24, 24)
    assert ModelConfig.from_pretrained(source).sliding_windows == (24, 24)


def test_rope_and_head_settings_kvflow_cannot_honour_are_refused(gguf_file, tmp_path):
    """A Phi-3 file whose LongRoPE factors do not fit its rotary, or come without their
    pair or beside another scaling, and values that differ from keys in size."""
    path, _ = gguf_file("phi3", "F32", dtype="float32")

    def cut(name, array, qtype):
        return (array[:3], qtype) if name == "rope_factors_long.weight" else (array, qtype)

    def drop(name, array, qtype):
        return None if name == "rope_factors_short.weight" else (array, qtype)

    cases = {
        "cut": (dict(tensor=cut), "rope_factors_long.weight holds 3 values; a rotary of 8 "
                                  "dims takes 4"),
        "drop": (dict(tensor=drop), r"LongRoPE needs both rope_factors_short and "
                                    r"rope_factors_long and no other scaling; the file has "
                                    r"\['rope_factors_long'\]"),
        "yarn": (dict(metadata={"phi3.rope.scaling.type": ("yarn", GGUFValueType.STRING)}),
                 "with RoPE scaling 'yarn'"),
        "value": (dict(metadata={"phi3.attention.value_length": (8, GGUFValueType.UINT32)}),
                  "'phi3.attention.value_length' is 8; kvflow takes 16 to 16, the key length"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_pretrained(rewrite_gguf(path, tmp_path / f"{name}.gguf", **change))


def test_bad_files_are_refused_with_the_thing_named(gguf_file, tmp_path):
    path, _ = gguf_file("llama-gqa", "Q4_0", **K_QUANT_SHAPE)
    data = path.read_bytes()
    for cut in (20, len(data) // 2, len(data) - 7):
        truncated = tmp_path / f"cut-{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="could not be read as GGUF"):
            ModelConfig.from_pretrained(truncated)
    with pytest.raises(ValueError, match="GGUF architecture 'phi2' is not supported"):
        ModelConfig.from_pretrained(rewrite_gguf(path, tmp_path / "arch.gguf", arch="phi2"))

    def q8_k(name, array, qtype):  # a type the gguf package cannot dequantize
        if name != "blk.1.ffn_up.weight":
            return array, qtype
        rows = array.shape[0]
        return np.zeros((rows, 512 // 256 * 292), dtype=np.uint8), GGMLQuantizationType.Q8_K

    with pytest.raises(ValueError, match="'blk.1.ffn_up.weight' is Q8_K, a type kvflow cannot"):
        ModelConfig.from_pretrained(rewrite_gguf(path, tmp_path / "q8k.gguf", tensor=q8_k))

    def narrow(name, array, qtype):  # 32 rows short
        return (array[:-32], qtype) if name == "blk.0.attn_k.weight" else (array, qtype)

    with pytest.raises(ValueError, match=r"'blk.0.attn_k.weight' has shape \[96, 256\], the "
                                         r"metadata implies \[128, 256\]"):
        ModelConfig.from_pretrained(rewrite_gguf(path, tmp_path / "shape.gguf", tensor=narrow))

    experts = rewrite_gguf(path, tmp_path / "experts.gguf",
                       extra={"blk.0.ffn_gate_inp.weight": np.ones((4, 256), dtype=np.float32)})
    with pytest.raises(ValueError, match="'blk.0.ffn_gate_inp.weight' has no counterpart"):
        ModelConfig.from_pretrained(experts)

    # An unknown type id: the type field of blk.0.ffn_up.weight's header (after its name,
    # dimension count and two uint64 dimensions) set to 99.
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8
    unknown = tmp_path / "type99.gguf"
    unknown.write_bytes(data[:at] + (99).to_bytes(4, "little") + data[at + 4:])
    with pytest.raises(ValueError, match="'blk.0.ffn_up.weight' has type id 99, which the gguf "
                                         "package does not know"):
        ModelConfig.from_pretrained(unknown)

    def drop(name, array, qtype):
        return None if name == "blk.1.ffn_down.weight" else (array, qtype)

    with pytest.raises(ValueError, match=r"lacks 1 tensors the model needs, e.g. "
                                         r"\['model.layers.1.mlp.down_proj.weight'\]"):
        ModelConfig.from_pretrained(rewrite_gguf(path, tmp_path / "drop.gguf", tensor=drop))
    with pytest.raises(ValueError, match="a GGUF file's weights keep the formats"):
        LLM(str(path), quantization="int8", device="cpu", kv_cache_memory="8MiB")


def test_the_command_line_takes_a_gguf_file(gguf_file, tmp_path, capsys):
    from kvflow.cli import main

    path, _ = gguf_file("llama-gqa", "Q4_0", **K_QUANT_SHAPE)
    assert main(["generate", str(path), "--prompt", "def", "--max-tokens", "3",
                 "--device", "cpu", "--kv-cache-memory", "8MiB"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:1000])
    # serve reads the file before it binds: a bad one ends the command with the reason.
    assert main(["serve", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "bad.gguf could not be read as GGUF" in err and "Traceback" not in err
    assert main(["serve", str(tmp_path / "missing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_server_answers_chat_from_a_gguf_file(gguf_file, tmp_path):
    """`kvflow serve model.gguf`: the chat template and tokenizer come from the file."""
    import httpx

    from server_process import ServerProcess

    from transformers import AutoTokenizer

    path, source = gguf_file("qwen2", "Q4_K_M", **K_QUANT_SHAPE)
    messages = [{"role": "user", "content": "hello"}]
    expected_prompt = AutoTokenizer.from_pretrained(source).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    server = ServerProcess(path, "--device", "cpu", "--kv-cache-memory", "8MiB",
                           log=tmp_path / "serve.log")
    try:
        server.wait_ready()
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": path.name, "max_tokens": 4, "temperature": 0,
            "messages": messages}).json()
        assert reply["choices"][0]["finish_reason"] == "length", reply
        assert reply["usage"]["completion_tokens"] == 4
        assert reply["usage"]["prompt_tokens"] == len(expected_prompt), reply["usage"]
    finally:
        assert server.stop()


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _key(name: bytes, value_type: GGUFValueType, payload: bytes) -> bytes:
    return _string(name) + struct.pack("<I", value_type) + payload


def _raw_gguf(path, keys=(), num_keys=None, tensors=b"", num_tensors=0, version=3,
              tail=b""):
    """A GGUF file written byte by byte, claiming whatever counts it is given."""
    body = b"".join(keys)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, num_tensors,
                                           len(keys) if num_keys is None else num_keys)
                     + body + tensors + tail)
    return path


_ARRAY = GGUFValueType.ARRAY
# Files whose header claims what their size or this machine cannot hold, with what the
# error must say; each was a hang, a traceback or gigabytes before it was checked.
_HOSTILE_HEADERS = {
    # 51 bytes that claimed 2^62 items: memory grew about 150 MB/s for ever
    "huge-array": (dict(keys=[_key(b"a", _ARRAY, struct.pack("<IQ", GGUFValueType.UINT8,
                                                             2**62))], tail=b"xy"),
                   "'a' is an array of 4,611,686,018,427,387,904 items; kvflow reads at most"),
    # an array the file does hold, past the cap (30M items took 11 GB)
    "long-array": (dict(keys=[_key(b"a", _ARRAY, struct.pack("<IQ", GGUFValueType.UINT8,
                                                             3_000_000) + bytes(3_000_000))]),
                   "'a' is an array of 3,000,000 items"),
    "short-array": (dict(keys=[_key(b"a", _ARRAY, struct.pack("<IQ", GGUFValueType.UINT32,
                                                              1000) + bytes(10))]),
                    "'a' \\(1,000 items\\) claims 4,000 bytes, but only 10 remain"),
    "short-strings": (dict(keys=[_key(b"a", _ARRAY, struct.pack("<IQ", GGUFValueType.STRING,
                                                                1000) + _string(b"x"))]),
                      "'a' \\(1,000 strings\\) claims 8,000 bytes, but only 9 remain"),
    "string-length": (dict(keys=[_key(b"a", GGUFValueType.STRING, struct.pack("<Q", 2**60))]),
                      "'a' claims 1,152,921,504,606,846,976 bytes, but only 0 remain"),
    # a million real keys took 3.6 GB
    "many-keys": (dict(keys=[_key(b"k%d" % i, GGUFValueType.UINT8, b"\0")
                             for i in range(1 << 20)]),
                  "the key count is 1,048,576; kvflow reads at most 65,536"),
    "key-count": (dict(keys=[_key(b"a", GGUFValueType.UINT8, b"\0")], num_keys=60_000),
                  "the key count \\(60,000\\) claims 780,000 bytes"),
    "key-name": (dict(keys=[struct.pack("<Q", 2**40)], tail=bytes(16)),
                 "key 0's name is 1,099,511,627,776 bytes long; kvflow reads at most 65,536"),
    "nested-array": (dict(keys=[_key(b"a", _ARRAY, struct.pack("<IQ", _ARRAY, 1))]),
                     "'a' is an array of arrays"),
    "value-type": (dict(keys=[_key(b"a", 77, b"")]), "'a' has value type 77"),
    "tensor-count": (dict(num_tensors=2**40), "the tensor count is 1,099,511,627,776"),
    "tensor-size": (dict(tensors=_string(b"t") + struct.pack("<I2QIQ", 2, 2**20, 2**20,
                                                             GGMLQuantizationType.F32, 0),
                         num_tensors=1, tail=bytes(31)),
                    "'t' claims 4,398,046,511,104 bytes at data offset 0, past the 0 bytes"),
    "tensor-dims": (dict(tensors=_string(b"t") + struct.pack("<I", 9), num_tensors=1,
                         tail=bytes(64)),
                    "'t' has 9 dimensions"),
    "version": (dict(version=1), "GGUF version 1 is not supported"),
}
# Metadata values that pass the header: block_count=1e8 took 15 GB and then a traceback.
_HOSTILE_VALUES = {
    "block-count": ({"llama.block_count": (100_000_000, GGUFValueType.UINT32)},
                    "'llama.block_count' is 100,000,000; kvflow takes 1 to 21, as the file "
                    "holds 21 tensors"),
    "block-count-u32": ({"llama.block_count": (2**32 - 1, GGUFValueType.UINT32)},
                        "'llama.block_count' is 4,294,967,295"),
    "block-count-text": ({"llama.block_count": ("2", GGUFValueType.STRING)},
                         "'llama.block_count' is '2', not an integer"),
    "head-count": ({"llama.attention.head_count": (0, GGUFValueType.UINT32)},
                   "'llama.attention.head_count' is 0; kvflow takes 1 to 64"),
    "kv-heads": ({"llama.attention.head_count_kv": (8, GGUFValueType.UINT32)},
                 "'llama.attention.head_count_kv' is 8; kvflow takes 1 to 4"),
    "width": ({"llama.embedding_length": (2**40, GGUFValueType.UINT64)},
              "'llama.embedding_length' is 1,099,511,627,776"),
    "context": ({"llama.context_length": (2**62, GGUFValueType.UINT64)},
                "'llama.context_length' is 4,611,686,018,427,387,904; kvflow takes 1 to "
                "1,048,576"),
    "eos": ({"tokenizer.ggml.eos_token_id": (10**9, GGUFValueType.UINT32)},
            "'tokenizer.ggml.eos_token_id' is 1,000,000,000; kvflow takes 0 to 383, the ids "
            "of its 384-token vocabulary"),
    "epsilon": ({"llama.attention.layer_norm_rms_epsilon": (float("nan"),
                                                            GGUFValueType.FLOAT32)},
                "'llama.attention.layer_norm_rms_epsilon' is nan, not a positive finite"),
    # an expert count makes a llama file Mixtral's, whose reader it would size
    "expert-count": ({"llama.expert_count": (2**31, GGUFValueType.UINT32)},
                     "'llama.expert_count' is 2,147,483,648; kvflow takes 0 to 16,384"),
}
# Loads each file in a process whose address space is capped, so that a file that makes
# memory grow fails there instead of taking the machine: prints, per file, the error's
# type and text and the seconds it took.
_LOAD_BOUNDED = """
import json, resource, sys, time
from kvflow.models.config import ModelConfig
from kvflow.models.gguf.tokenizer import load_gguf_tokenizer
status = open("/proc/self/status").read()
size = int(status.split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = {}
for name, path in json.loads(sys.argv[1]).items():
    start = time.monotonic()
    for load in (ModelConfig.from_pretrained, load_gguf_tokenizer):
        try:
            load(path)
            outcome = ("loaded", "")
        except BaseException as exc:
            outcome = (type(exc).__name__, str(exc))
        results.setdefault(name, []).append([*outcome, time.monotonic() - start])
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024
print(json.dumps({"results": results, "rss_growth": growth}))
"""


def test_hostile_files_are_refused_fast_in_bounded_memory(gguf_file, tmp_path):
    """Every count, length, shape and offset a file claims is checked against its size
    before anything is allocated, and config values against their ranges: each file here
    fails with a ValueError naming what it claims, within seconds, in a process that
    could not have grown by more than 1 GiB."""
    paths, expected = {}, {}
    for name, (layout, message) in _HOSTILE_HEADERS.items():
        paths[name] = str(_raw_gguf(tmp_path / f"{name}.gguf", **layout))
        expected[name] = message
    source, _ = gguf_file("llama-gqa", "F32")
    for name, (metadata, message) in _HOSTILE_VALUES.items():
        paths[name] = str(rewrite_gguf(source, tmp_path / f"{name}.gguf", metadata=metadata))
        expected[name] = message
    run = subprocess.run([sys.executable, "-c", _LOAD_BOUNDED, json.dumps(paths)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    wrong = [(name, kind, message, seconds)
             for name, outcomes in report["results"].items()
             # the tokenizer reads the header only, so takes the header's cases
             for kind, message, seconds in outcomes[:1 if name in _HOSTILE_VALUES else 2]
             if kind != "ValueError" or not re.search(expected[name], message)
             or seconds > 10]
    assert not wrong
    assert report["rss_growth"] < 512 * 2**20, report["rss_growth"]


@pytest.mark.parametrize("variant,recipe", [("llama3-rope", "Q4_K_M"), ("phi3", "BF16"),
                                            ("gemma2", "F16")])
def test_kvflow_reads_what_the_gguf_package_reads(gguf_file, variant, recipe):
    """kvflow's own header reader (kvflow/models/gguf/header.py) against GGUFReader: every
    metadata value, and every tensor's type, shape and bytes (Llama 3's rope_freqs and
    Phi-3's LongRoPE factors included)."""
    from kvflow.models.gguf import GgufFile

    path, _ = gguf_file(variant, recipe, **_k_quant_shape(variant))
    ours, reader = GgufFile(path), GGUFReader(path)
    # GGUFReader adds the header's counts as GGUF.* fields
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == list(fields)
    for key, field in fields.items():
        assert ours.get(key) == field.contents(), key
    theirs = {t.name: t for t in reader.tensors}
    assert len(theirs) == len(ours.tensors) + len(ours.rope_tensors)
    for name, tensor in ours.tensors.items():
        expected = theirs[name]
        assert tensor.type_name == expected.tensor_type.name
        assert tensor.shape == tuple(reversed(expected.shape.tolist()))
        assert tensor.data.dtype == expected.data.dtype
        assert np.array_equal(tensor.data, expected.data), name
    for base, values in ours.rope_tensors.items():
        assert np.array_equal(values, np.asarray(theirs[f"{base}.weight"].data).reshape(-1))


def test_metadata_that_the_reader_could_not_hold_is_refused(gguf_file, monkeypatch):
    import kvflow.models.gguf.header as header

    path, _ = gguf_file("llama-gqa", "F32")
    monkeypatch.setattr(header, "available_host_memory", lambda: 2**20)
    with pytest.raises(ValueError, match=r"its metadata holds [\d,]+ keys, tensors and array "
                                         r"items, which would take the gguf reader about"):
        ModelConfig.from_pretrained(path)


# Loops 10^10 times; for a conversation of more than one message only, so that the server's
# probe render at load (one message) passes and requests meet it.
_RUNAWAY = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
            "{% endfor %}")


def _serve_template(source, tmp_path, name, template):
    from server_process import ServerProcess

    path = rewrite_gguf(source, tmp_path / f"{name}.gguf",
                    metadata={"tokenizer.chat_template": (template, GGUFValueType.STRING)})
    return ServerProcess(path, "--device", "cpu", "--kv-cache-memory", "8MiB",
                         log=tmp_path / f"{name}.log")


def test_a_runaway_chat_template_is_a_400_and_the_server_serves_on(gguf_file, tmp_path):
    """A GGUF file's template that loops pinned both tokenizer threads for good while
    /health said 200. Each render now has 5 s in a worker process that is killed after:
    both requests get a 400 naming the budget, and the server answers the next chat."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    source, _ = gguf_file("llama-gqa", "F32")
    template = ("{% if messages | length > 1 %}" + _RUNAWAY + "{% endif %}"
                "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                "{% endfor %}<|assistant|>")
    server = _serve_template(source, tmp_path, "runaway", template)
    hi = [{"role": "user", "content": "hi"}]

    def chat(messages):
        start = time.monotonic()
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "messages": messages, "max_tokens": 2, "temperature": 0})
        return reply, time.monotonic() - start

    try:
        server.wait_ready()
        with ThreadPoolExecutor(2) as pool:  # one on each tokenizer thread
            runaways = list(pool.map(chat, [hi * 2, hi * 3]))
        for reply, seconds in runaways:
            assert reply.status_code == 400, reply.text
            assert "did not finish within 5 s" in reply.json()["error"]["message"]
            assert seconds < 30  # 5 s, plus starting the second worker on a busy machine
        reply, _ = chat(hi)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        assert server.stop()


def test_a_template_that_runs_away_on_the_probe_render_fails_the_load(gguf_file, tmp_path):
    """The server is not healthy until it has answered one generation and rendered its
    template for a one-message conversation: a template that loops on every conversation
    is a failed load that /health reports, not a server that answers 200 and then hangs."""
    import time

    import httpx

    source, _ = gguf_file("llama-gqa", "F32")
    server = _serve_template(source, tmp_path, "always", _RUNAWAY + "{{ messages }}")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                health = httpx.get(server.url + "/health", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.3)
                continue
            if "loading" not in health.text:
                break
            time.sleep(0.3)
        assert health.status_code == 503, health.text
        assert ("the model failed to load: the chat template failed on a one-message "
                "conversation: it did not finish within 5 s") in health.json()["error"]["message"]
    finally:
        assert server.stop()
