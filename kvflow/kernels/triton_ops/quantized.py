"""Quantized linear layers in Triton for CUDA's small batches: the int8 and int4 weights
read in kvflow's own layouts (kvflow/quantization/int8.py, int4.py), dequantized in
registers, and multiplied in one launch with the scale and bias applied on the way out.

At one row a decode reads every weight once, so what counts is bytes: int8 reads half of
bf16's, int4 a quarter, where dequantizing first (the `dequantize` kernel) writes and
reads a bf16 copy. The tuning (kvflow/kernels/tuning.py) measures these against the
other candidates on the GPU and checks them against the dequantized product first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.quantization.int4 import ROW_BLOCK

BLOCK_M = 16  # tl.dot's least; a decode's one row is masked up to it
BLOCK_N = 32


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _int8_kernel(x, weight, scale, bias, out, M, N, K, stride_xm, stride_om,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xs = tl.load(x + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        qs = tl.load(weight + cols[None, :].to(tl.int64) * K + ks[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0)  # [K, N]
        # int8 values are exact in every float type x may have
        acc += tl.dot(xs, qs.to(xs.dtype), input_precision=PRECISION)
    y = acc * tl.load(scale + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             y.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ (weight int8 [N, K] * scale [N]).T + bias -> [M, N] in x's dtype."""
    x = x.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M))
    _int8_kernel[grid](x, weight, scale, x if bias is None else bias, out, m, n, k,
                       x.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=64,
                       PRECISION=_precision(x.dtype))
    return out


@triton.jit
def _int4_kernel(x, packed, scale, offset, bias, out, M, N, K, stride_xm, stride_om,
                 GROUP: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # the weight's rows
    row_ok = rows < M
    col_ok = cols < N
    groups = K // GROUP
    # int4.py's layout: blocks of 16 weight rows, each a run of 32-byte chunks, chunk c
    # holding columns 4c..4c+3 of its 16 rows; row r's bytes 2r and 2r + 1 hold columns
    # 4c and 4c + 1 in their low nibbles and 4c + 2 and 4c + 3 in their high ones.
    block_base = (cols // ROWS_PER_BLOCK).to(tl.int64) * (ROWS_PER_BLOCK * K // 2) \
        + (cols % ROWS_PER_BLOCK) * 2
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        xs = tl.load(x + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                     mask=row_ok[:, None], other=0.0)
        byte = block_base[None, :] + ((ks // 4) * 32 + ks % 2)[:, None]  # [K, N]
        bits = tl.load(packed + byte, mask=col_ok[None, :], other=0).to(tl.int32)
        q = (bits >> (((ks % 4) // 2) * 4)[:, None]) & 15
        # BLOCK_K divides GROUP: the tile's columns share one group
        group = cols.to(tl.int64) * groups + start // GROUP
        s = tl.load(scale + group, mask=col_ok, other=0.0).to(tl.float32)
        o = tl.load(offset + group, mask=col_ok, other=0.0).to(tl.float32)
        # rounded to x's dtype as the dequantized weight is
        w = (q.to(tl.float32) * s[None, :] + o[None, :]).to(xs.dtype)
        acc += tl.dot(xs, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             acc.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                offset: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W.T + bias, W = q * scale + offset per group of columns, q packed as
    int4.py lays it out ([N, K / 2] uint8; scale, offset [N, K / group]) -> [M, N]."""
    x = x.contiguous()
    (m, k), n = x.shape, packed.shape[0]
    group = k // scale.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M))
    _int4_kernel[grid](x, packed, scale, offset, x if bias is None else bias, out, m, n, k,
                       x.stride(0), out.stride(0), GROUP=group, ROWS_PER_BLOCK=ROW_BLOCK,
                       HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                       BLOCK_K=min(64, group & -group), PRECISION=_precision(x.dtype))
    return out
