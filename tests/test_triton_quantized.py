"""Triton's int8 and int4 linear kernels for CUDA (kvflow/kernels/triton_ops/quantized.py),
under Triton's interpreter where there is no GPU, against the dequantized product:
kvflow's own weight layouts, one to a few rows, output rows not a multiple of a tile,
int4 groups of 32, 64 and 128 columns, with and without a bias."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (make test installs it)")

from kvflow.quantization.int4 import dequantize_int4, quantize_int4  # noqa: E402
from kvflow.quantization.int8 import dequantize_int8, quantize_int8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def quantized():
    from kvflow.kernels.triton_ops import quantized as module

    return module


def reference(x, weight, bias):
    """The dequantize kernel's product: the weight rounded to x's dtype first."""
    out = x.float() @ weight.to(x.dtype).float().T
    return out if bias is None else out + bias.float()


def tolerance(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("shape,bias", [((48, 96), False), ((80, 200), True)])
def test_int8_matches_the_dequantized_product(shape, bias, rows, dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    q, scale = quantize_int8(weight, dtype)
    b = torch.randn(shape[0], generator=generator).to(dtype) if bias else None
    x = torch.randn(rows, shape[1], generator=generator).to(dtype)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = quantized().int8_linear(to(x), to(q), to(scale), to(b))
    assert out.dtype == dtype and out.shape == (rows, shape[0])
    torch.testing.assert_close(out.cpu().float(), reference(x, dequantize_int8(q, scale), b),
                               **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("shape,group,bias", [((48, 128), 32, False), ((32, 192), 64, True),
                                              ((80, 256), 128, False)])
def test_int4_matches_the_dequantized_product(shape, group, bias, rows, dtype):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(*shape, generator=generator)
    packed, scale, offset = quantize_int4(weight, group, dtype)
    b = torch.randn(shape[0], generator=generator).to(dtype) if bias else None
    x = torch.randn(rows, shape[1], generator=generator).to(dtype)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = quantized().int4_linear(to(x), to(packed), to(scale), to(offset), to(b))
    torch.testing.assert_close(out.cpu().float(),
                               reference(x, dequantize_int4(packed, scale, offset), b),
                               **tolerance(dtype))


def test_the_kernels_are_cuda_candidates_for_small_batches():
    from kvflow.quantization.int4 import Int4LinearMethod
    from kvflow.quantization.int8 import Int8LinearMethod

    for method in (Int8LinearMethod, Int4LinearMethod):
        kernel = method.kernels["triton"]
        assert kernel.devices == ("cuda",) and kernel.gemv
