"""Weight-only quantization at load (kvflow/quantization/): packing, every kernel against
float32 x @ dequantize(W).T (apart from quantization error), and whole engines whose
logits stay close to the unquantized model's."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, prompt_logprobs
from kvflow.layers.linear import Linear, MergedLinear
from kvflow.models.loader import default_dtype
from kvflow.quantization import quantization_config
from kvflow.kernels import variants
from kvflow.quantization.base import QuantizedPlan, dequantize_buffer
from kvflow.quantization.int4 import (Int4Config, blocked_scales, pack_int4, quantize_int4,
                                     unpack_int4)
from kvflow.quantization.int8 import Int8Config, activation_block, quantize_int8

ROWS = [1, 3, 8, 17, 130]
DTYPES = [torch.float32, torch.bfloat16]


def test_int4_packing_round_trips_exactly():
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (48, 192), generator=generator, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (48, 96) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # The documented layout: in the block of rows 16-31, byte 2r + j of chunk c (32 bytes)
    # holds row 16 + r's columns 4c + j (low nibble) and 4c + 2 + j (high nibble).
    block = packed[16:32].reshape(-1)
    r, c, j = 5, 30, 1
    assert block[32 * c + 2 * r + j].item() == \
        q[16 + r, 4 * c + j].item() | q[16 + r, 4 * c + 2 + j].item() << 4


def test_int4_refuses_rows_its_layout_cannot_block():
    with pytest.raises(ValueError, match="multiple of 16 output rows"):
        pack_int4(torch.zeros(40, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="part 'b' has 40"):
        MergedLinear(64, {"a": 32, "b": 40}, False, quantization_config("int4", 32))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_int8_quantization_is_exact_on_its_grid_and_bounded_off_it(dtype):
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(40, 96, generator=generator)
    w[3] = 0  # an all-zero row quantizes to zeros, not NaN
    q, scale = quantize_int8(w, dtype)
    assert q.dtype == torch.int8 and scale.dtype == dtype and q.abs().max() <= 127
    dequant = q.float() * scale.float()[:, None]
    assert torch.equal(dequant[3], torch.zeros(96))
    assert ((dequant - w).abs() <= scale.float()[:, None] * 0.51 + 1e-6).all()
    # A weight already on the grid comes back bit for bit.
    q2, scale2 = quantize_int8(dequant, dtype)
    assert torch.equal(q2, q) and torch.equal(scale2, scale)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_quantization_is_exact_on_its_grid_and_bounded_off_it(dtype, group_size):
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=generator)
    w[2, :group_size] = 0.5  # a constant group
    packed, scale, offset = quantize_int4(w, group_size, dtype)
    assert scale.shape == offset.shape == (32, 256 // group_size) and scale.dtype == dtype
    q = unpack_int4(packed).float().view(32, -1, group_size)
    dequant = (q * scale.float()[..., None] + offset.float()[..., None]).view(32, 256)
    assert torch.allclose(dequant[2, :group_size], torch.full((group_size,), 0.5),
                          rtol=1e-2)
    step = scale.float().repeat_interleave(group_size, dim=1)
    # Offsets and scales rounded to the dtype shift the grid by at most a rounding step.
    slack = 0.51 * step + offset.float().abs().repeat_interleave(group_size, 1) * 2 ** -7
    assert ((dequant - w).abs() <= slack + 1e-6).all()
    again = quantize_int4(dequant, group_size, dtype)
    assert torch.equal(unpack_int4(again[0]), unpack_int4(packed))


def _quantized_layer(name: str, dtype: torch.dtype, bias: bool, merged: bool = False,
                     group_size: int = 64, seed: int = 3) -> Linear:
    """A layer of 96 outputs over 192 inputs, loaded (shard by shard when merged) from a
    random float32 weight."""
    config = quantization_config(name, group_size)
    generator = torch.Generator().manual_seed(seed)
    with default_dtype(dtype):
        layer = (MergedLinear(192, {"a": 32, "b": 64}, bias, config) if merged
                 else Linear(192, 96, bias, config))
    w = torch.randn(96, 192, generator=generator) / 14
    b = torch.randn(96, generator=generator)
    shards = [("a", 0, 32), ("b", 32, 64)] if merged else [(None, 0, 96)]
    for shard, start, size in shards:
        layer.weight.weight_loader(layer.weight, w[start:start + size], shard)
        if bias:
            layer.bias.weight_loader(layer.bias, b[start:start + size], shard)
    return layer


def _expected(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    weight = layer.method.dequantize(layer)
    y = x.float() @ weight.T
    return y if layer.bias is None else y + layer.bias.float()


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    # bf16 inputs: the kernels round x, the dequantized weight or the output to bf16.
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(actual.float(), expected, atol=tolerance, rtol=tolerance)


def _kernel_cases() -> list[tuple[str, str]]:
    from kvflow.quantization.int4 import Int4LinearMethod
    from kvflow.quantization.int8 import Int8LinearMethod

    methods = {"int8": Int8LinearMethod, "int4": Int4LinearMethod}
    return [(name, kernel, device, dtype) for name, method in methods.items()
            for kernel, spec in method.kernels.items() if not spec.native
            for device in DEVICES if device in spec.devices
            for dtype in DTYPES if spec.dtypes is None or dtype in spec.dtypes]


@pytest.mark.parametrize("name,kernel,device,dtype", _kernel_cases())
@pytest.mark.parametrize("bias", [False, True])
def test_pytorch_kernels_match_the_dequantized_product(name, kernel, device, dtype, bias):
    """Each kernel through a plan that sends every batch to it, on ragged batches, on every
    device at hand that it runs on."""
    layer = _quantized_layer(name, dtype, bias).to(device)
    prepare = layer.method.kernels[kernel].prepare
    layer.plan = QuantizedPlan(ops=None, small=kernel, small_max_rows=0, large=kernel,
                               weights=prepare(layer) if prepare else ())
    generator = torch.Generator().manual_seed(4)
    for rows in ROWS:
        x = torch.randn(rows, 192, generator=generator).to(device=device, dtype=dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (rows, 96)
        _close(y, _expected(layer, x.float()), dtype)


# The int8 GEMVs read their weight as the tuning chose (a GemvVariant); int4's do not.
NATIVE_CASES = pytest.mark.parametrize("name,group_size,variant", [
    *(("int8", 64, variant) for variant in variants.CANDIDATES),
    *(("int4", group_size, variants.DEFAULT) for group_size in (32, 64, 192))], ids=str)


@NATIVE_CASES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_native_kernels_match_the_dequantized_product(kernel_ops, name, group_size, variant,
                                                      dtype, bias):
    """kvflow's int8 and int4 kernels, as this machine builds them and with AVX-512 off, on
    ragged batches: the GEMVs up to 8 rows, the native dequantize-then-GEMM above."""
    layer = _quantized_layer(name, dtype, bias, group_size=group_size)
    layer.plan = QuantizedPlan(ops=kernel_ops, small="native", small_max_rows=8,
                               large="native_dequantize", variant=variant)
    generator = torch.Generator().manual_seed(5)
    for rows in ROWS:
        x = torch.randn(rows, 192, generator=generator).to(dtype)
        _close(layer(x), _expected(layer, x.float()), dtype)


@pytest.mark.parametrize("name,group_size", [("int8", 64), ("int4", 32), ("int4", 192)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_dequantize_equals_the_reference_dequantization(kernel_ops, name, group_size,
                                                               dtype):
    """The weight the native dequantize kernels hand to the GEMM is the reference's,
    rounded once to the model's dtype: equal for int8; for int4 the compiler may fuse the
    multiply and the add, which moves a value by a float32 step before the rounding (so a
    bf16 value rarely, by one bf16 step)."""
    layer = _quantized_layer(name, dtype, bias=False, group_size=group_size, seed=8)
    expected = layer.method.dequantize(layer).to(dtype)
    if name == "int8":
        actual = kernel_ops.int8_dequantize(layer.weight, layer.weight_scale)
        assert torch.equal(actual, expected)
    else:
        actual = kernel_ops.int4_dequantize(layer.weight, layer.weight_scale,
                                            layer.weight_offset)
        assert actual.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(actual, expected, atol=1e-7, rtol=2 ** -22)
        else:
            torch.testing.assert_close(actual, expected, atol=0, rtol=2 ** -7)
            assert (actual != expected).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gemv_reads_prepared_scales_as_it_gathers_them(kernel_ops, dtype):
    """The plan keeps the int4 scales blocked as the GEMV reads them (blocked_scales); the
    product is the same, bit for bit, as when the kernel gathers them itself."""
    layer = _quantized_layer("int4", dtype, bias=True, group_size=32, seed=10)
    blocked = (blocked_scales(layer.weight_scale, layer.weight_offset),)
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(6)).to(dtype)
    args = (x, layer.weight, layer.weight_scale, layer.weight_offset, layer.bias)
    assert torch.equal(kernel_ops.int4_gemv(*args, *blocked), kernel_ops.int4_gemv(*args))
    layer.plan = QuantizedPlan(ops=kernel_ops, small="native", small_max_rows=8,
                               large="native_dequantize", weights=blocked)
    _close(layer(x), _expected(layer, x.float()), dtype)
    with pytest.raises(RuntimeError, match="blocked must be"):
        kernel_ops.int4_gemv(*args, blocked[0][1:])


def _int8_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantized as the native_int8_activations kernels quantize it, written out
    independently: per block of columns, scale = max |x| / 127 and q = x / scale rounded
    to nearest even (x times 127 / max in float32). -> (q [rows, blocks, block] float64,
    scale [rows, blocks] float64)."""
    blocks = x.float().view(x.shape[0], -1, block)
    amax = blocks.abs().amax(dim=2)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse[..., None])
    return q.double(), (amax / 127).double()


def _int8_activations_expected(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """The product with x quantized, from the layer's integer weights, in float64."""
    rows, cols = layer.out_features, layer.in_features
    if layer.weight.dtype == torch.int8:
        block = activation_block(cols)
        q, scale = _int8_activations(x, block)
        w = layer.weight.double().view(rows, cols // block, block)
        dots = torch.einsum("mbk,nbk->mnb", q, w)
        y = (dots * scale[:, None, :]).sum(dim=2) * layer.weight_scale.double()
    else:
        groups = layer.weight_scale.shape[1]
        q, scale = _int8_activations(x, cols // groups)
        w = unpack_int4(layer.weight).double().view(rows, groups, -1)
        dots = torch.einsum("mgk,ngk->mng", q, w)
        offsets = layer.weight_offset.double() * q.sum(dim=2)[:, None, :]  # [m, n, g]
        y = ((dots * layer.weight_scale.double() + offsets) * scale[:, None, :]).sum(dim=2)
    return y if layer.bias is None else y + layer.bias.double()


@NATIVE_CASES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_activation_kernels_compute_their_integer_product(kernel_ops, name, group_size,
                                                               variant, dtype, bias):
    """The GEMVs that quantize x to int8 (vpdpbusd where the build has AVX512-VNNI, plain
    loops otherwise), on ragged batches, against the same quantization of x written out
    in float64: equal to float32 rounding (bf16: to the output's rounding). Against the
    float product each output moves by at most half a step of x per column, weighted by
    the weight: sum over blocks of scale(x) / 2 * sum |w|."""
    layer = _quantized_layer(name, dtype, bias, group_size=group_size, seed=12)
    kernel = layer.method.kernels["native_int8_activations"]
    layer.plan = QuantizedPlan(ops=kernel_ops, small="native_int8_activations",
                               small_max_rows=200, large="native_dequantize",
                               weights=kernel.prepare(layer), variant=variant)
    generator = torch.Generator().manual_seed(13)
    for rows in ROWS:
        x = torch.randn(rows, 192, generator=generator).to(dtype)
        x[0, :64] = 0  # a block of zeros quantizes to zeros
        y = layer(x)
        assert y.dtype == dtype and y.shape == (rows, 96)
        exact = _int8_activations_expected(layer, x)
        scale = exact.abs().max().item()
        tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8
        assert (y.double() - exact).abs().max().item() <= tolerance * scale
        block = activation_block(192) if name == "int8" else group_size
        weight = layer.method.dequantize(layer).double().abs().view(96, -1, block)
        bound = torch.einsum("mb,nb->mn", _int8_activations(x, block)[1] / 2, weight.sum(2))
        float_error = (y.double() - _expected(layer, x.float()).double()).abs()
        assert (float_error <= bound + tolerance * scale).all()


def test_int8_activation_kernels_refuse_what_they_cannot_read(kernel_ops):
    from kvflow.quantization.int8 import block_sums

    int8 = _quantized_layer("int8", torch.float32, bias=False)
    int4 = _quantized_layer("int4", torch.float32, bias=False, group_size=64)
    x = torch.randn(2, 192)
    (sums,) = block_sums(int8)
    assert sums.shape == (96, 3) and sums.dtype == torch.int32
    with pytest.raises(RuntimeError, match="wsum must be int32"):
        kernel_ops.int8_gemv_q8(x, int8.weight, int8.weight_scale, sums.float(), None)
    with pytest.raises(RuntimeError, match="wsum must be int32"):
        kernel_ops.int8_gemv_q8(x, int8.weight, int8.weight_scale, sums[:, :2], None)
    blocked = blocked_scales(int4.weight_scale, int4.weight_offset)
    with pytest.raises(RuntimeError, match="blocked must be"):
        kernel_ops.int4_gemv_q8(x, int4.weight, blocked[1:], None)
    with pytest.raises(RuntimeError, match="blocked must be"):
        kernel_ops.int4_gemv_q8(x.bfloat16(), int4.weight, blocked, None)
    with pytest.raises(ValueError, match="multiple of 64 input columns, not 96"):
        block_sums(Linear(96, 32, False, Int8Config()))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_native_dequantize_writes_into_the_buffer_it_is_given(kernel_ops, name):
    """Large batches dequantize into one reused buffer per shape; a buffer of the wrong
    shape or dtype is refused, not written past."""
    layer = _quantized_layer(name, torch.bfloat16, bias=False, group_size=32, seed=9)
    args = ((layer.weight, layer.weight_scale) if name == "int8" else
            (layer.weight, layer.weight_scale, layer.weight_offset))
    dequantize = getattr(kernel_ops, f"{name}_dequantize")
    shape = (layer.out_features, layer.in_features)
    buffer = dequantize_buffer(shape, torch.bfloat16)
    assert buffer is dequantize_buffer(shape, torch.bfloat16)
    result = dequantize(*args, buffer)
    assert result.data_ptr() == buffer.data_ptr()
    assert torch.equal(result, dequantize(*args))
    for wrong in (torch.empty(shape[0] - 1, shape[1], dtype=torch.bfloat16),
                  torch.empty(shape, dtype=torch.float32)):
        with pytest.raises(RuntimeError, match="out must be"):
            dequantize(*args, wrong)
    assert dequantize_buffer((2**14, 2**12), torch.float32) is None  # above the size cap


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_merged_layers_quantize_each_shard_into_its_rows(name):
    merged = _quantized_layer(name, torch.bfloat16, bias=True, merged=True)
    whole = _quantized_layer(name, torch.bfloat16, bias=True)
    for param_name, param in whole.named_parameters():
        assert torch.equal(getattr(merged, param_name), param), param_name


def test_quantized_loaders_refuse_bad_tensors():
    layer = _quantized_layer("int8", torch.float32, bias=False)
    with pytest.raises(ValueError, match=r"shape \(96, 100\), expected \(96, 192\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(96, 100), None)
    with pytest.raises(ValueError, match="floating-point checkpoint weight, got torch.int32"):
        layer.weight.weight_loader(layer.weight, torch.zeros(96, 192, dtype=torch.int32), None)


def test_bad_quantization_options_are_refused_by_name():
    with pytest.raises(ValueError, match=r"quantization='fp8' is not supported.*'int8' or 'int4'"):
        quantization_config("fp8", 128)
    with pytest.raises(ValueError, match="multiple of 32, got 48"):
        Int4Config(48)
    with pytest.raises(ValueError, match="multiple of 64 and of the group size \\(128\\); a "
                                         "layer has 64"):
        Linear(64, 32, False, Int4Config(128))
    assert quantization_config(None, 128) is None
    assert isinstance(quantization_config("int8", 128), Int8Config)


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["native", "eager"])
@pytest.mark.parametrize("name,tolerance", [("int8", 0.2), ("int4", 1.5)])
def test_quantized_engines_stay_close_to_the_unquantized_model(checkpoint, name, tolerance,
                                                               enforce_eager):
    """Prompt logprobs of a tiny random Llama (bf16, tied head, q/k/v biases) quantized at
    load, against the same model unquantized, on the native and the eager path. The test
    weights are drawn large so that outputs vary, which also amplifies every error: int8
    moves them by about 0.08 on average here, int4 (groups of 32) by about 0.7."""
    path = checkpoint("llama-mha-tied-bias", dtype="bfloat16")
    _, reference = prompt_logprobs(path, enforce_eager=enforce_eager)
    llm, quantized = prompt_logprobs(path, enforce_eager=enforce_eager, quantization=name,
                                      quantization_group_size=32)
    model = llm.engine.runner.model
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(layers) == 4 * model.config.num_layers  # every decoder linear, no head
    assert all(type(m.method).__name__ == f"Int{name[3]}LinearMethod" for m in layers)
    if enforce_eager:
        assert all(m.plan is None for m in layers)
    else:
        assert all(isinstance(m.plan, QuantizedPlan) for m in layers)
    for q, r in zip(quantized, reference):
        assert (q - r).abs().mean() < tolerance
        assert not torch.equal(q, r)  # the weights really were quantized


def test_the_command_line_takes_quantization(checkpoint, capsys):
    from kvflow.cli import main

    path = str(checkpoint("llama-gqa"))
    assert main(["generate", path, "--prompt", "def", "--max-tokens", "2", "-q", "int4",
                 "--quantization-group-size", "32", "--device", "cpu",
                 "--kv-cache-memory", "8MiB"]) == 0
    assert main(["generate", path, "--prompt", "def", "--quantization", "fp8"]) == 2
    assert "quantization='fp8' is not supported" in capsys.readouterr().err
    assert main(["generate", path, "--prompt", "def", "--quantization", "int4",
                 "--quantization-group-size", "128"]) == 2
    assert "a layer has 64" in capsys.readouterr().err


def test_planning_never_chooses_a_kernel_that_disagrees_with_the_dequantized_product(
        monkeypatch):
    """Without the native kernels (CUDA, or a dtype they lack) the quantized layers are
    planned among PyTorch's kernels; one that computes a wrong product (an op whose
    layout this code had wrong, say) is left out, whatever its speed."""
    from torch import nn

    from kvflow.kernels.tuning import install_quantized_kernels
    from kvflow.quantization.base import QuantizedKernel
    from kvflow.quantization.int8 import Int8LinearMethod

    def fast_but_wrong(layer, x, ops):
        return torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype)

    kernels = {**Int8LinearMethod.kernels, "wrong": QuantizedKernel(fast_but_wrong)}
    monkeypatch.setattr(Int8LinearMethod, "kernels", kernels)
    model = nn.ModuleList([_quantized_layer("int8", torch.bfloat16, bias=True, seed=s)
                           for s in range(3)])
    install_quantized_kernels(model)
    for layer in model:
        assert {layer.plan.small, layer.plan.large} <= {"torch", "dequantize"}
        assert layer.plan.ops is None
        x = torch.randn(5, 192).to(torch.bfloat16)
        _close(layer(x), _expected(layer, x.float()), torch.bfloat16)


def test_a_quantized_heads_large_batch_kernel_is_timed_at_decode_batches_only(checkpoint,
                                                                              monkeypatch):
    """The head sees the rows being sampled, never a prefill's worth: its large-batch
    kernel is chosen at GEMM_ROWS' decode batch alone, the decoder's at every size."""
    from kvflow import LLM
    from kvflow.kernels import tuning

    timed: list[tuple[list, tuple[int, ...]]] = []
    plan = tuning._plan_quantized
    monkeypatch.setattr(tuning, "_plan_quantized", lambda label, layers, ops, cache, rows: (
        timed.append((layers, rows)), plan(label, layers, ops, cache, rows)))
    llm = LLM(model=str(checkpoint("llama-gqa", dtype="bfloat16")), quantization="int8",
              quantize_lm_head=True, kv_cache_memory="16MiB")
    head = llm.engine.runner.model.lm_head
    assert [rows for layers, rows in timed if head in layers] == [tuning.GEMM_ROWS[:1]]
    decoder = [rows for layers, rows in timed if head not in layers]
    assert decoder and all(rows == tuning.GEMM_ROWS for rows in decoder)


@pytest.mark.parametrize("variant", ["llama-mha-tied-bias", "llama-gqa"])
def test_quantize_lm_head_runs_the_head_in_int8_and_keeps_the_embedding(checkpoint, variant):
    """--quantize-lm-head, tied (the head is then a copy of the embedding) and untied: the
    head's weight is the per-channel int8 of the checkpoint's, the embedding keeps the
    model's dtype for lookups, and the decoder's format is unchanged."""
    from safetensors.torch import load_file

    from kvflow.quantization.int8 import Int8LinearMethod

    path = checkpoint(variant, dtype="bfloat16")
    _, reference = prompt_logprobs(path)
    llm, quantized = prompt_logprobs(path, quantize_lm_head=True)
    model = llm.engine.runner.model
    assert isinstance(model.lm_head.method, Int8LinearMethod)
    assert isinstance(model.lm_head.plan, QuantizedPlan)
    tensors = load_file(path / "model.safetensors")
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    q, scale = quantize_int8(head, torch.bfloat16)
    assert torch.equal(model.lm_head.weight, q) and torch.equal(model.lm_head.weight_scale, scale)
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    decoder = [m for m in model.model.modules() if isinstance(m, Linear)]
    assert all(m.weight.dtype == torch.bfloat16 for m in decoder)
    for q_lp, r_lp in zip(quantized, reference):
        assert (q_lp - r_lp).abs().mean() < 0.2
    # Decode-sized batches run the int8 head. Larger ones (a prompt's logprobs, say) run
    # the head's plan, or for a tied head the embedding it was made from, which costs less
    # than dequantizing the copy. Where the int8 GEMV is the small kernel is measured per
    # machine and kept: measured beside other load, this tiny head's may win at no batch
    # size, and then every batch is a large one.
    small_rows = model.lm_head.plan.small_max_rows
    tied = model.config.tie_word_embeddings
    cases = [(small_rows, True)] if small_rows else []
    for rows, uses_head in [*cases, (small_rows + 1, not tied)]:
        hidden = torch.randn(rows, model.config.hidden_size).to(torch.bfloat16)
        embedding_logits = hidden.float() @ model.model.embed_tokens.weight.float().T
        head_logits = hidden.float() @ model.lm_head.method.dequantize(model.lm_head).T
        assert not torch.allclose(embedding_logits, head_logits, atol=1e-3, rtol=0)
        torch.testing.assert_close(model.compute_logits(hidden).float(),
                                   head_logits if uses_head else embedding_logits,
                                   atol=0.05, rtol=0.02)
