"""The native expert kernel and the int8 and int4 expert formats: the kernel against a
per-token loop over dequantized float32 experts, on ragged groups (experts without rows,
one expert with every row, top-k 1, 2 and 8) through its GEMV loops, its GEMMs and both in
one call, as this machine builds it and with AVX-512 off; each format's experts as that
format quantizes a linear layer's weight; and a kernel that computes a wrong product left
unused."""
from __future__ import annotations

import functools
import logging
import sys
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from kvflow.kernels import variants
from kvflow.kernels.variants import GemvVariant
from kvflow.layers.activation import ClampedSwiGLU, GeluTanhAndMul, SiluAndMul
from kvflow.layers.moe import FusedMoE
from kvflow.models.loader import default_dtype
from kvflow.quantization.gptq_awq import CheckpointFormatConfig
from kvflow.quantization.int4 import Int4Config, quantize_int4
from kvflow.quantization.int8 import Int8Config, activation_block, quantize_int8

HIDDEN, INNER, EXPERTS, GROUP_SIZE = 128, 64, 16, 32
FORMATS = {"float": None, "int8": Int8Config(), "int4": Int4Config(GROUP_SIZE)}
DTYPES = [torch.float32, torch.bfloat16]


def _float_weights(hidden: int, inner: int, bias: bool, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"gate_up_proj": (EXPERTS, 2 * inner, hidden), "down_proj": (EXPERTS, hidden, inner)}
    if bias:
        shapes |= {"gate_up_proj_bias": (EXPERTS, 2 * inner), "down_proj_bias": (EXPERTS, hidden)}
    return {name: torch.randn(shape, generator=generator) * (0.2 if "bias" in name else
                                                              shape[-1] ** -0.5)
            for name, shape in shapes.items()}


def _layer(fmt: str, dtype: torch.dtype, activation: torch.nn.Module | None = None,
           bias: bool = False, hidden: int = HIDDEN, inner: int = INNER,
           seed: int = 0) -> FusedMoE:
    """An expert layer in `fmt`, its float32 weights loaded (and quantized) stacked."""
    with default_dtype(dtype):
        layer = FusedMoE(EXPERTS, hidden, inner, activation or SiluAndMul(), bias=bias,
                         quant_config=FORMATS[fmt], prefix="experts")
    for name, tensor in _float_weights(hidden, inner, bias, seed).items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor, None)
    return layer


def _int8_rounded(rows: torch.Tensor) -> torch.Tensor:
    """rows as the int8-activation loops see them: each block of activation_block(columns)
    columns rounded to 255 steps of its largest magnitude (half to even)."""
    block = activation_block(rows.shape[-1])
    blocks = rows.float().unflatten(-1, (-1, block))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(scale > 0, 1 / scale, 0))
    return (q * scale).flatten(-2)


def _reference(layer: FusedMoE, x: torch.Tensor, weights: torch.Tensor,
               ids: torch.Tensor, int8_experts: frozenset[int] = frozenset()) -> torch.Tensor:
    """Every token's experts one at a time, in float32, on the dequantized weights (the
    inputs of int8_experts' projections rounded as the int8-activation loops round
    them)."""
    dequantized = {(name, expert): layer.method.expert_weight(layer, name, expert).float()
                   for name in ("gate_up_proj", "down_proj") for expert in ids.unique().tolist()}
    out = torch.zeros(x.shape, dtype=torch.float32)
    for token in range(x.shape[0]):
        for weight, expert in zip(weights[token].tolist(), ids[token].tolist()):
            def project(name: str, rows: torch.Tensor) -> torch.Tensor:
                bias = getattr(layer, f"{name}_bias")
                rows = _int8_rounded(rows) if expert in int8_experts else rows
                return F.linear(rows, dequantized[name, expert],
                                None if bias is None else bias[expert].float())

            out[token] += weight * project("down_proj", layer.act(project("gate_up_proj",
                                                                          x[token].float())))
    return out


def _choices(case: str, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) [tokens, top_k]. ragged: 37 tokens, expert 0 in three of four, the
    rest spread over experts 1 to 12 and none to 13 to 15; one-expert: expert 5 in every
    token; decode: one token."""
    generator = torch.Generator().manual_seed(top_k)
    tokens = {"ragged": 37, "one-expert": 23, "decode": 1}[case]
    rows = []
    for token in range(tokens):
        others = torch.randperm(12, generator=generator) + 1
        first = {"ragged": 0 if token < tokens * 3 // 4 else int(others[-1]),
                 "one-expert": 5, "decode": int(others[-1])}[case]
        rest = [int(e) for e in others if e != first]
        rows.append([first, *rest[:top_k - 1]])
    return torch.rand(tokens, top_k, generator=generator), torch.tensor(rows)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within the dtype's rounding, which moves an output by a step of the values it was
    computed from (in bf16: each projection and the sum are rounded on the way), so in
    proportion to the outputs' scale."""
    scale = max(1.0, expected.abs().max().item())
    atol, rtol = (2e-5, 1e-4) if dtype == torch.float32 else (1e-2, 4e-2)
    torch.testing.assert_close(actual.float(), expected, atol=atol * scale, rtol=rtol)


def _native(layer: FusedMoE, ops: types.ModuleType, gemv_max_rows: int,
            variant: GemvVariant = variants.DEFAULT) -> FusedMoE:
    assert layer.attach_native(ops), "the kernel disagreed with the PyTorch path (see the log)"
    layer.plan = replace(layer.plan, gemv_max_rows=gemv_max_rows, variant=variant)
    return layer


@functools.cache
def _ragged_case(fmt: str, dtype: torch.dtype, top_k: int,
                 case: str) -> tuple[FusedMoE, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    """(layer, x, weights, ids, the reference's output), the PyTorch path checked against
    the reference."""
    layer = _layer(fmt, dtype)
    weights, ids = _choices(case, top_k)
    x = torch.randn(ids.shape[0], HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = _reference(layer, x, weights, ids)
    _close(layer(x, weights, ids), expected, dtype)
    return layer, x, weights, ids, expected


# Rows per expert up to which the GEMV loops run: every count, none (every expert a GEMM),
# and 2 (the experts with a few rows through GEMVs, the others through GEMMs, in one call).
PATHS = {"gemv": sys.maxsize, "gemm": 0, "mixed": 2}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["ragged", "one-expert", "decode"])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_matches_a_per_token_loop_on_ragged_groups(kernel_ops, fmt, dtype, top_k, case,
                                                          path):
    layer, x, weights, ids, expected = _ragged_case(fmt, dtype, top_k, case)
    if case == "ragged":
        assert set(ids.flatten().tolist()) <= set(range(13))
    y = _native(layer, kernel_ops, PATHS[path])(x, weights, ids)
    assert y.dtype == dtype and y.shape == x.shape
    _close(y, expected, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [GeluTanhAndMul, ClampedSwiGLU], ids=["gelu-tanh",
                                                                          "clamped-swiglu"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_takes_every_activation_and_biases(kernel_ops, fmt, activation, dtype, path):
    layer = _layer(fmt, dtype, activation(), bias=True)
    weights, ids = _choices("ragged", 2)
    # Large enough that the clamped SwiGLU's limit cuts some values.
    x = 4 * torch.randn(ids.shape[0], HIDDEN, generator=torch.Generator().manual_seed(2))
    x = x.to(dtype)
    _close(_native(layer, kernel_ops, PATHS[path])(x, weights, ids),
           _reference(layer, x, weights, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_on_shapes_that_leave_part_groups(kernel_ops, dtype):
    """Widths that are no multiple of the GEMV's 4 rows or its 16 and 32 columns."""
    layer = _layer("float", dtype, hidden=40, inner=27)
    weights, ids = _choices("ragged", 2)
    x = torch.randn(ids.shape[0], 40, generator=torch.Generator().manual_seed(3)).to(dtype)
    expected = _reference(layer, x, weights, ids)
    for path in PATHS.values():
        _close(_native(layer, kernel_ops, path)(x, weights, ids), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tokens_output_does_not_depend_on_its_batch_through_the_gemv_loops(kernel_ops, fmt,
                                                                             dtype):
    layer = _native(_layer(fmt, dtype), kernel_ops, sys.maxsize)
    weights, ids = _choices("ragged", 8)
    x = torch.randn(ids.shape[0], HIDDEN, generator=torch.Generator().manual_seed(4)).to(dtype)
    batched = layer(x, weights, ids)
    for token in (0, 20, 36):
        alone = layer(x[token:token + 1], weights[token:token + 1], ids[token:token + 1])
        assert torch.equal(alone[0], batched[token])


@pytest.mark.parametrize("variant", variants.CANDIDATES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_gemv_variant_computes_the_experts(kernel_ops, fmt, dtype, variant):
    """However the tuning has the GEMV loops read the weights: ragged groups, widths that
    leave part groups, and a token's output the same alone as in its batch."""
    layer, x, weights, ids, expected = _ragged_case(fmt, dtype, 8, "ragged")
    for path in ("gemv", "mixed"):
        _close(_native(layer, kernel_ops, PATHS[path], variant)(x, weights, ids), expected,
               dtype)
    batched = _native(layer, kernel_ops, sys.maxsize, variant)(x, weights, ids)
    for token in (0, 36):
        alone = layer(x[token:token + 1], weights[token:token + 1], ids[token:token + 1])
        assert torch.equal(alone[0], batched[token])
    if fmt == "float":
        odd = _layer("float", dtype, hidden=40, inner=27)
        weights, ids = _choices("ragged", 2)
        x = torch.randn(ids.shape[0], 40, generator=torch.Generator().manual_seed(3)).to(dtype)
        _close(_native(odd, kernel_ops, sys.maxsize, variant)(x, weights, ids),
               _reference(odd, x, weights, ids), dtype)


@pytest.mark.parametrize("variant", variants.CANDIDATES, ids=str)
@pytest.mark.parametrize("case", ["ragged", "decode"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_experts_with_int8_activations(kernel_ops, dtype, case, variant):
    """The GEMV loops with x quantized to int8 per block (VNNI's integer products, or the
    plain loop's), given the method's weight sums: the per-token loop on inputs rounded
    alike, through every variant and with the GEMMs beside them; a token's output the same
    alone as in its batch; the projections' sums both or neither, int8's only, their shape
    checked."""
    layer = _layer("int8", dtype)
    weights, ids = _choices(case, 8)
    x = torch.randn(ids.shape[0], HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    sums = layer.method.int8_activation_sums(layer)
    assert [tuple(s.shape) for s in sums] == [(EXPERTS, 2 * INNER, 1), (EXPERTS, HIDDEN, 1)]
    counts = torch.bincount(ids.flatten(), minlength=EXPERTS)
    for path in ("gemv", "mixed"):  # the GEMMs take x as it is
        gemv_experts = frozenset(e for e in range(EXPERTS) if counts[e] <= PATHS[path])
        expected = _reference(layer, x, weights, ids, gemv_experts)
        _native(layer, kernel_ops, PATHS[path], variant)
        layer.plan = replace(layer.plan, weight_sums=sums)
        y = layer(x, weights, ids)
        if dtype == torch.float32:  # only the sums' order separates them
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(y, expected, atol=1e-4 * scale, rtol=1e-4)
        else:
            _close(y, expected, dtype)
    # Further from the unrounded products, by the inputs' rounding.
    assert (y.float() - _reference(layer, x, weights, ids)).abs().max() > 0
    layer.plan = replace(layer.plan, gemv_max_rows=sys.maxsize)
    batched = layer(x, weights, ids)
    alone = layer(x[:1], weights[:1], ids[:1])
    assert torch.equal(alone[0], batched[0])
    plan = layer.plan
    for bad, message in [((sums[0], None), "both projections or neither"),
                         ((sums[0][:, :, :0], sums[1]), "weight sums must be contiguous int32"),
                         ((sums[0].float(), sums[1]), "weight sums must be contiguous int32")]:
        layer.plan = replace(plan, weight_sums=bad)
        with pytest.raises(RuntimeError, match=message):
            layer(x, weights, ids)
    int4 = _native(_layer("int4", dtype), kernel_ops, sys.maxsize)
    int4.plan = replace(int4.plan, weight_sums=sums)
    with pytest.raises(RuntimeError, match="weight sums are int8's"):
        int4(x, weights, ids)
    assert int4.method.int8_activation_sums(int4) is None


@pytest.mark.parametrize("fmt,quantize", [
    ("int8", lambda w: quantize_int8(w, torch.bfloat16)),
    ("int4", lambda w: quantize_int4(w, GROUP_SIZE, torch.bfloat16))])
def test_quantized_experts_are_each_a_weight_in_the_linear_format(fmt, quantize):
    """Each expert's projection holds what the format's linear layers hold for that weight,
    whether the checkpoint stores the experts stacked or one tensor per expert."""
    stacked = _layer(fmt, torch.bfloat16)
    per_expert = _layer(fmt, torch.bfloat16, seed=1)
    source = _float_weights(HIDDEN, INNER, bias=False, seed=0)
    gate, up = source["gate_up_proj"].split(INNER, dim=1)
    for expert in range(EXPERTS):
        for name, shard, tensor in [("gate_up_proj", "gate", gate), ("gate_up_proj", "up", up),
                                    ("down_proj", "down", source["down_proj"])]:
            param = getattr(per_expert, name)
            param.weight_loader(param, tensor[expert], f"{shard}:{expert}")
    suffixes = ("", "_scale") if fmt == "int8" else ("", "_scale", "_offset")
    for name in ("gate_up_proj", "down_proj"):
        for expert in (0, 7, EXPERTS - 1):
            parts = quantize(source[name][expert])
            for suffix, part in zip(suffixes, parts, strict=True):
                assert torch.equal(getattr(stacked, name + suffix)[expert], part)
                assert torch.equal(getattr(per_expert, name + suffix)[expert], part)


def test_quantized_expert_layers_check_their_sizes_and_what_they_load():
    with pytest.raises(ValueError, match=r"multiple of 64 and of the group size \(128\); "
                                         r"experts\.down_proj has 64"):
        FusedMoE(EXPERTS, HIDDEN, INNER, SiluAndMul(), quant_config=Int4Config(128),
                 prefix="experts")
    layer = _layer("int8", torch.float32)
    with pytest.raises(ValueError, match="shape"):
        layer.down_proj.weight_loader(layer.down_proj, torch.randn(HIDDEN, INNER + 1), "down:2")
    with pytest.raises(ValueError, match="floating-point"):
        layer.down_proj.weight_loader(layer.down_proj, torch.ones(HIDDEN, INNER, dtype=torch.int8),
                                      "down:2")
    with pytest.raises(ValueError, match="'gptq' has no method for expert layers"):
        CheckpointFormatConfig("gptq").expert_method("model.layers.0.mlp.experts")


def test_a_kernel_that_disagrees_with_the_pytorch_path_is_not_used(kernel_ops, caplog):
    """A fast but wrong kernel (a layout this code had wrong, say) leaves the layer on the
    PyTorch path, with a warning."""
    def wrong(x, *args):
        return kernel_ops.moe_experts(x, *args) * 1.5

    layer = _layer("float", torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="kvflow.layers.moe"):
        assert not layer.attach_native(types.SimpleNamespace(moe_experts=wrong))
    assert layer.plan is None
    assert "disagrees with the PyTorch path on experts" in caplog.text


def test_kernel_refuses_what_it_cannot_read(kernel_ops):
    layer = _native(_layer("int4", torch.bfloat16), kernel_ops, sys.maxsize)
    x = torch.randn(3, HIDDEN).to(torch.bfloat16)
    weights = torch.rand(3, 2)
    with pytest.raises(RuntimeError, match="expert id out of range"):
        layer(x, weights, torch.tensor([[0, 1], [2, EXPERTS], [3, 4]]))
    plan = layer.plan
    layer.plan = replace(plan, scales=(layer.gate_up_proj_scale, plan.scales[1]))
    with pytest.raises(RuntimeError, match="int4 scales must be blocked"):
        layer(x, weights, torch.tensor([[0, 1], [2, 3], [3, 4]]))
    layer.plan = replace(plan, activation=("relu", 0.0, 0.0))
    with pytest.raises(RuntimeError, match="activation must be silu, gelu_tanh or clamped_swiglu"):
        layer(x, weights, torch.tensor([[0, 1], [2, 3], [3, 4]]))


@pytest.mark.parametrize("winner", ["float", "int8"])
def test_the_tuning_takes_int8_activations_where_they_measure_faster(kernel_ops, monkeypatch,
                                                                     winner):
    """bf16 int8 experts: the tuning offers the GEMV loops on x quantized to int8 once they
    compute a sample as the PyTorch path does, and keeps whichever measured faster (the
    measurement forced here), each layer with its own weight sums; float32 models and int4
    experts are never offered them."""
    from kvflow.kernels import tuning

    class Cache:
        def get(self, key, measure):
            return measure()

    # Measurements are the tuning's own business: here each choice is forced, the variants'
    # and the GEMV rows' (to the first, and 2) as well as the activations'.
    monkeypatch.setattr(tuning, "_fastest", lambda candidates, run: (
        winner if set(candidates) == {"float", "int8"} else candidates[0]))
    monkeypatch.setattr(tuning, "_expert_gemv_max_rows", lambda layers: 2)
    layers = torch.nn.ModuleList([_native(_layer("int8", torch.bfloat16, seed=s), kernel_ops,
                                          sys.maxsize) for s in range(2)])
    tuning._plan_experts(layers, Cache())
    weights, ids = _choices("ragged", 2)
    x = torch.randn(ids.shape[0], HIDDEN, generator=torch.Generator().manual_seed(5))
    x = x.to(torch.bfloat16)
    counts = torch.bincount(ids.flatten(), minlength=EXPERTS)
    for layer in layers:
        rounded = frozenset()
        if winner == "float":
            assert layer.plan.weight_sums is None
        else:
            expected = layer.method.int8_activation_sums(layer)
            assert all(torch.equal(a, b) for a, b in zip(layer.plan.weight_sums, expected))
            rounded = frozenset(e for e in range(EXPERTS)
                                if counts[e] <= layer.plan.gemv_max_rows)
        _close(layer(x, weights, ids), _reference(layer, x, weights, ids, rounded),
               torch.bfloat16)
    for fmt, dtype in (("int8", torch.float32), ("int4", torch.bfloat16)):
        layer = _native(_layer(fmt, dtype), kernel_ops, sys.maxsize)
        tuning._plan_experts(torch.nn.ModuleList([layer]), Cache())
        assert layer.plan.weight_sums is None
