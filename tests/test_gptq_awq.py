"""GPTQ and AWQ checkpoints (kvflow/quantization/gptq_awq.py), packed here by an independent
packer that follows the published layouts (no GPTQ or AWQ library installs with this torch
on the CPU), from a tiny random Llama saved by transformers.

The layouts, per linear layer of `in` inputs and `out` outputs, groups = in / group_size:
- GPTQ (AutoGPTQ / GPTQModel): qweight int32 [in / 8, out], eight 4-bit q per int32 along
  the input, low nibble first; qzeros int32 [groups, out / 8], eight zeros per int32 along
  the output, low nibble first; scales fp16 [groups, out]; g_idx int32 [in] = i // group.
  The "gptq" (v1) format stores zero - 1 in qzeros, "gptq_v2" the zero.
- AWQ (AutoAWQ, GEMM): qweight int32 [in, out / 8], packed along the output: nibble p of
  each int32 (bits 4p..4p+3) holds column AWQ_ORDER[p] = [0, 2, 4, 6, 1, 3, 5, 7][p] of its
  eight; qzeros int32 [groups, out / 8], packed the same way; scales fp16 [groups, out].
- Both: W[o, i] = (q[i, o] - z[g, o]) * s[g, o], g = i // group_size.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_greedy_matches, hf_greedy, random_prompts
from kvflow import LLM, SamplingParams
from kvflow.layers.linear import Linear
from kvflow.models.config import ModelConfig
from kvflow.quantization.gptq_awq import read_checkpoint_quantization, to_int4, unpack_layer
from kvflow.quantization.int4 import Int4LinearMethod, dequantize_int4
from kvflow.quantization.unquantized import UnquantizedLinearMethod

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTIONS_WEIGHT = tuple(f"{p}.weight" for p in PROJECTIONS)

# name -> quantization_config; the packer reads method, sym/zero_point and format from it.
CASES = {
    "gptq-v1-asym": dict(quant_method="gptq", bits=4, group_size=32, sym=False,
                         desc_act=False),
    "gptq-v1-sym": dict(quant_method="gptq", bits=4, group_size=-1, sym=True, desc_act=True),
    "gptq-v2-asym": dict(quant_method="gptq", bits=4, group_size=32, sym=False,
                         desc_act=False, checkpoint_format="gptq_v2"),
    "gptq-v2-sym": dict(quant_method="gptq", bits=4, group_size=64, sym=True, desc_act=False,
                        checkpoint_format="gptq_v2"),
    "awq": dict(quant_method="awq", bits=4, group_size=32, zero_point=True, version="gemm",
                modules_to_not_convert=["model.layers.1.mlp.down_proj"]),
    "awq-no-zero-point": dict(quant_method="awq", bits=4, group_size=64, zero_point=False,
                              version="GEMM"),
}


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words of 32 bits -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _pack_along_last(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[..., n] nibbles -> int32 [..., n / 8]: nibble p of each word holds value order[p]."""
    eights = values.long().view(*values.shape[:-1], -1, 8)
    words = sum(eights[..., order[p]] << (4 * p) for p in range(8))
    return _to_int32(words)


def pack_gptq(q, z, s, v1: bool) -> dict[str, torch.Tensor]:
    """q [in, out], z and s [groups, out] -> GPTQ's tensors."""
    in_features = q.shape[0]
    eights = q.long().view(in_features // 8, 8, -1)
    qweight = _to_int32(sum(eights[:, j] << (4 * j) for j in range(8)))
    stored = (z - 1) & 15 if v1 else z
    group = in_features // z.shape[0]
    return {"qweight": qweight, "qzeros": _pack_along_last(stored, list(range(8))),
            "scales": s.half(), "g_idx": torch.arange(in_features, dtype=torch.int32) // group}


def pack_awq(q, z, s) -> dict[str, torch.Tensor]:
    return {"qweight": _pack_along_last(q, AWQ_ORDER), "qzeros": _pack_along_last(z, AWQ_ORDER),
            "scales": s.half()}


def quantize_rtn(weight: torch.Tensor, group: int, sym: bool):
    """Round to nearest: W [out, in] -> q [in, out], z, s [groups, out] (s through fp16)."""
    out, in_features = weight.shape
    groups = weight.float().t().reshape(in_features // group, group, out)
    if sym:
        s = (groups.abs().amax(dim=1) / 7).half().float()
        z = torch.full_like(s, 8, dtype=torch.long)
    else:
        low, high = groups.amin(dim=1), groups.amax(dim=1)
        s = ((high - low) / 15).half().float()
        # From 1: the v1 format stores zero - 1, so it cannot store a zero of 0.
        z = torch.round(-low / s).clamp(1, 15).long()
    q = torch.round(groups / s[:, None] + z[:, None]).clamp(0, 15).long()
    return q.reshape(in_features, out), z, s


def dequantize_reference(q, z, s) -> torch.Tensor:
    """float32 W [out, in] = (q - z) * s."""
    group = q.shape[0] // z.shape[0]
    zeros, scales = z.repeat_interleave(group, 0), s.float().repeat_interleave(group, 0)
    return ((q - zeros).float() * scales).t()


def write_checkpoint(source, out, config: dict, skip: tuple[str, ...] = ()) -> dict:
    """A GPTQ/AWQ checkpoint of `source`'s weights in `out` (float tensors in fp16, as such
    checkpoints have them), and the float32 weights it stands for, by name."""
    weights = load_file(str(source / "model.safetensors"))
    tensors, reference = {}, {}
    gptq = config["quant_method"] == "gptq"
    sym = config.get("sym", not config.get("zero_point", True))
    for key, value in weights.items():
        module = key.removesuffix(".weight")
        quantized = (key.endswith(PROJECTIONS_WEIGHT) and module not in skip
                     and module not in config.get("modules_to_not_convert", []))
        if not quantized:
            tensors[key] = value.half()
            reference[key] = value.half().float()
            continue
        group = config["group_size"] if config["group_size"] != -1 else value.shape[1]
        q, z, s = quantize_rtn(value, group, sym)
        if gptq:
            v1 = config.get("checkpoint_format", "gptq") == "gptq"
            parts = pack_gptq(q, z, s, v1)
        else:
            parts = pack_awq(q, z, s)
        tensors.update({f"{module}.{name}": part for name, part in parts.items()})
        reference[key] = dequantize_reference(q, z, s)
    out.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, out / file.name)
    hf_config = json.loads((source / "config.json").read_text())
    hf_config.pop("dtype", None)
    hf_config.update(torch_dtype="float16", quantization_config=config)
    (out / "config.json").write_text(json.dumps(hf_config))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return reference


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    """quantized(case) -> (GPTQ/AWQ checkpoint, float32 checkpoint of its dequantized
    weights, those weights by name)."""
    source = checkpoint("llama-gqa")
    cache = {}

    def make(case: str):
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            weights = write_checkpoint(source, root / "quantized", CASES[case])
            reference = root / "reference"
            shutil.copytree(source, reference)
            save_file({k: v.contiguous() for k, v in weights.items()},
                      str(reference / "model.safetensors"), metadata={"format": "pt"})
            cache[case] = (root / "quantized", reference, weights)
        return cache[case]

    return make


@pytest.mark.parametrize("method,v1", [("gptq", True), ("gptq", False), ("awq", None)])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_unpacking_matches_the_reference_dequantization(method, v1, sym, group_size):
    """Random q, zeros and scales of a 128 x 64 layer, packed and loaded into int4: exact in
    float32; in fp16 and bf16 the only rounding is of scale and offset (-zero * scale,
    exact in float32) to that dtype, half a unit in the last place of each."""
    generator = torch.Generator().manual_seed(3)
    in_features, out = 128, 64
    groups = in_features // (in_features if group_size == -1 else group_size)
    q = torch.randint(0, 16, (in_features, out), generator=generator)
    z = (torch.full((groups, out), 8) if sym
         else torch.randint(1 if v1 else 0, 16, (groups, out), generator=generator))
    s = (torch.rand(groups, out, generator=generator) * 0.1 + 1e-3).half().float()
    raw = dict(quant_method=method, bits=4, group_size=group_size)
    if method == "gptq":
        raw.update(sym=sym, checkpoint_format="gptq" if v1 else "gptq_v2")
        parts = pack_gptq(q, z, s, v1)
    else:
        raw.update(zero_point=not sym)
        parts = pack_awq(q, z, s)
        if sym:
            del parts["qzeros"]
    quant = read_checkpoint_quantization(raw)
    reference = dequantize_reference(q, z, s)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        packed, scale, offset = to_int4(*unpack_layer(quant, "layer", parts), dtype)
        assert scale.dtype == offset.dtype == dtype and scale.shape == (out, groups)
        loaded = dequantize_int4(packed, scale, offset)
        rounded = dequantize_int4(packed, s.t().to(dtype), (-z * s).t().to(dtype))
        assert torch.equal(loaded, rounded)
        if dtype == torch.float32:
            assert torch.equal(loaded, reference)
        else:  # each of q * scale and offset off by at most half a unit in the last place
            eps = torch.finfo(dtype).eps
            bound = (q.t().float() + z.repeat_interleave(in_features // groups, 0).t()) * (
                s.repeat_interleave(in_features // groups, 0).t() * eps)
            assert ((loaded - reference).abs() <= bound).all()


def _linears(llm: LLM) -> dict[str, Linear]:
    model = llm.engine.runner.model
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def _llm(path, **options) -> LLM:
    return LLM(str(path), **{"device": "cpu", "kv_cache_memory": "8MiB", **options})


@pytest.mark.parametrize("case", ["gptq-v1-asym", "awq"])
def test_loaded_weights_equal_the_reference_dequantization(quantized, case):
    """In float32 every layer, each shard of the fused q/k/v and gate/up layers included,
    holds exactly the weights the checkpoint stands for; layers the checkpoint left in
    float (AWQ's modules_to_not_convert, the LM head) stay unquantized."""
    path, _, weights = quantized(case)
    layers = _linears(_llm(path, dtype="float32", enforce_eager=True))
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, layer in layers.items():
        if name == "lm_head":
            assert isinstance(layer.method, UnquantizedLinearMethod)
            continue
        parent, _, leaf = name.rpartition(".")
        expected = torch.cat([weights[f"{parent}.{shard}.weight"]
                              for shard in fused.get(leaf, (leaf,))])
        if name in CASES[case].get("modules_to_not_convert", []):
            assert isinstance(layer.method, UnquantizedLinearMethod)
            assert torch.equal(layer.weight, expected)
        else:
            assert isinstance(layer.method, Int4LinearMethod)
            assert torch.equal(layer.method.dequantize(layer), expected), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_match_transformers_on_the_dequantized_weights(quantized, hf_model,
                                                                     case):
    """kvflow in float32 on the checkpoint against transformers in float32 on the weights
    it stands for: the same tokens (desc_act with i // group_size g_idx loads, in
    gptq-v1-sym)."""
    path, reference, _ = quantized(case)
    prompts = random_prompts(3, seed=6)
    llm = _llm(path, dtype="float32")
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert_greedy_matches(tokens, [hf_greedy(hf_model(reference), p, MAX_TOKENS)
                                   for p in prompts], MAX_TOKENS)
    assert len({tuple(t) for t in tokens}) > 1


def test_the_default_dtype_on_the_cpu_is_bf16_and_the_flag_may_name_the_format(quantized):
    """dtype="auto" on an fp16 GPTQ checkpoint runs bf16 on the CPU (kvflow's CPU kernels
    take no fp16); --quantization gptq is accepted on a GPTQ checkpoint and refused on any
    other, as are int8 and int4."""
    path, _, _ = quantized("gptq-v2-asym")
    assert ModelConfig.from_pretrained(path).checkpoint_dtype == torch.float16
    llm = _llm(path, quantization="gptq")
    assert llm.engine.dtype == torch.bfloat16
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
    with pytest.raises(ValueError, match=r"quantization='awq', but .* is a GPTQ checkpoint"):
        _llm(path, quantization="awq")
    with pytest.raises(ValueError, match=r"quantization='int4' quantizes a float checkpoint "
                                         r"at load; .* is a GPTQ checkpoint"):
        _llm(path, quantization="int4")


def test_the_flag_is_refused_on_a_float_checkpoint(checkpoint, capsys):
    from kvflow.cli import main

    path = str(checkpoint("llama-gqa"))
    with pytest.raises(ValueError, match="quantization='awq' is for AWQ checkpoints, but .* has "
                                         "no quantization_config"):
        _llm(path, quantization="awq")
    assert main(["generate", path, "--prompt", "def", "--quantization", "gptq",
                 "--device", "cpu", "--kv-cache-memory", "8MiB"]) == 2
    assert "has no quantization_config with quant_method 'gptq'" in capsys.readouterr().err


def _bad(checkpoint, tmp_path, name, config_changes=None, tensors=None, skip=()):
    """A GPTQ (gptq-v1-asym) checkpoint with its quantization_config changed and
    `tensors(dict)` applied to its tensors."""
    out = tmp_path / name
    write_checkpoint(checkpoint("llama-gqa"), out, {**CASES["gptq-v1-asym"],
                                                   **(config_changes or {})}, skip)
    if tensors is not None:
        file = out / "model.safetensors"
        changed = load_file(str(file))
        tensors(changed)
        save_file(changed, str(file), metadata={"format": "pt"})
    return out


def test_bad_configs_are_refused_with_the_value_named(checkpoint, tmp_path):
    cases = {
        "bits": ({"bits": 8}, "quantization_config.bits is 8: kvflow loads 4-bit GPTQ"),
        "group": ({"group_size": 48}, "group_size is 48: kvflow's int4 needs a multiple of 32"),
        "method": ({"quant_method": "bitsandbytes"},
                   "quant_method 'bitsandbytes' is not supported"),
        "format": ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not"),
        "awq-gemv": ({"quant_method": "awq", "version": "gemv"},
                     "version 'gemv' is not supported: kvflow loads AWQ's GEMM"),
    }
    source = checkpoint("llama-gqa")
    for name, (changes, message) in cases.items():
        out = tmp_path / name
        shutil.copytree(source, out)
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = {**CASES["gptq-v1-asym"], **changes}
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_pretrained(out)


def test_bad_tensors_are_refused_with_the_tensor_named(checkpoint, tmp_path):
    q_proj = "model.layers.0.self_attn.q_proj"

    def drop_qzeros(t):
        del t[f"{q_proj}.qzeros"]

    def narrow_scales(t):
        t[f"{q_proj}.scales"] = t[f"{q_proj}.scales"][:, :-8].contiguous()

    def odd_rows(t):
        t[f"{q_proj}.qweight"] = t[f"{q_proj}.qweight"][:, :56].contiguous()

    def float_qweight(t):
        t[f"{q_proj}.qweight"] = t[f"{q_proj}.qweight"].float()

    def act_order(t):
        t[f"{q_proj}.g_idx"] = t[f"{q_proj}.g_idx"].flip(0).contiguous()

    def quantized_head(t):
        head = t.pop("lm_head.weight").float()
        q, z, s = quantize_rtn(head, 32, sym=False)
        t.update({f"lm_head.{k}": v for k, v in pack_gptq(q, z, s, v1=True).items()})

    missing = (rf"lacks {q_proj}.qzeros \(each quantized layer has qweight, qzeros, scales, "
               r"g_idx\)")
    cases = {
        "qzeros": (drop_qzeros, missing),
        "scales": (narrow_scales, rf"{q_proj}.scales has shape \(2, 56\), expected \(2, 64\)"),
        "rows": (odd_rows, f"{q_proj} has 56 outputs: kvflow's int4 needs a multiple of 16"),
        "dtype": (float_qweight, f"{q_proj}.qweight is torch.float32, expected torch.int32"),
        "g_idx": (act_order, f"{q_proj}.g_idx is not i // group_size: act-order"),
        "head": (quantized_head, "lm_head.qweight: a quantized lm_head is not supported"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            _llm(_bad(checkpoint, tmp_path, name, tensors=change), enforce_eager=True)
    mixed = _bad(checkpoint, tmp_path, "mixed", skip=("model.layers.0.self_attn.k_proj",))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.qkv_proj fuses quantized and "
                                         "unquantized shards"):
        _llm(mixed, enforce_eager=True)
