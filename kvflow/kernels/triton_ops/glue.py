"""The step's glue in Triton, for CUDA: RMSNorm fused with the residual add, SiLU-and-mul,
and rotate-half RoPE in place. Each is one launch where PyTorch's eager path takes three
to eight.

The functions have the names and signatures of the native CPU kernels' (kvflow/kernels/
csrc/cpu_ops.cpp), so a layer takes either module through its NativeKernelHook. Like
those kernels they round to the activations' dtype after each operation that the eager
layers (kvflow/layers) round after, so that bfloat16 results match eager ones.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rounded(x, like):
    """x (float32) rounded to the element type of pointer `like`, back in float32."""
    return x.to(like.dtype.element_ty).to(tl.float32)


@triton.jit
def _rms_norm_kernel(out, x, residual, weight, dim, eps, HAS_RESIDUAL: tl.constexpr,
                     FLOAT_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    value = tl.load(x + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        value = _rounded(value + tl.load(residual + row * dim + cols, mask=mask,
                                         other=0.0).to(tl.float32), x)
        tl.store(residual + row * dim + cols, value.to(residual.dtype.element_ty), mask=mask)
    normed = value / tl.sqrt(tl.sum(value * value, 0) / dim + eps)
    if not FLOAT_WEIGHT:  # eager: weight * x32.to(dtype); Gemma's: (x32 * weight).to(dtype)
        normed = _rounded(normed, x)
    w = tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * dim + cols, (w * normed).to(out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
             eps: float) -> torch.Tensor:
    """RMSNorm of x (contiguous, [..., dim]); given a residual, x is first added to it in
    place and the sum normalized. weight: x's dtype, or float32 (multiplied in float32)."""
    dim = x.shape[-1]
    out = torch.empty_like(x)
    rows = x.numel() // dim
    if rows:
        _rms_norm_kernel[(rows,)](out, x, x if residual is None else residual, weight, dim,
                                  eps, HAS_RESIDUAL=residual is not None,
                                  FLOAT_WEIGHT=weight.dtype == torch.float32
                                  and x.dtype != torch.float32,
                                  BLOCK=triton.next_power_of_2(dim))
    return out


@triton.jit
def _silu_and_mul_kernel(out, x, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x + row * 2 * d + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + row * 2 * d + d + cols, mask=mask, other=0.0).to(tl.float32)
    activated = _rounded(gate * tl.sigmoid(gate), x)
    tl.store(out + row * d + cols, (activated * up).to(out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate, then up) -> silu(gate) * up, [..., d]."""
    x = x.contiguous()
    d = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], d)
    rows = x.numel() // (2 * d) if d else 0
    if rows:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](out, x, d, BLOCK=block)
    return out


@triton.jit
def _rotate(x, token, position, cos, sin, heads, stride_t, stride_h, dim,
            HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    half = dim // 2
    cols = tl.arange(0, HALF_PAD)
    col_ok = cols < half
    # cos/sin rounded to x's dtype first, as eager's cos.to(q.dtype)
    c1 = _rounded(tl.load(cos + position * dim + cols, mask=col_ok), x)[None, :]
    c2 = _rounded(tl.load(cos + position * dim + half + cols, mask=col_ok), x)[None, :]
    s1 = _rounded(tl.load(sin + position * dim + cols, mask=col_ok), x)[None, :]
    s2 = _rounded(tl.load(sin + position * dim + half + cols, mask=col_ok), x)[None, :]
    rows = tl.arange(0, HEADS_PAD)[:, None]
    mask = (rows < heads) & col_ok[None, :]
    first = x + token * stride_t + rows * stride_h + cols[None, :]
    a = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    new_a = _rounded(_rounded(a * c1, x) + _rounded(-b * s1, x), x)
    new_b = _rounded(_rounded(b * c2, x) + _rounded(a * s2, x), x)
    tl.store(first, new_a.to(x.dtype.element_ty), mask=mask)
    tl.store(first + half, new_b.to(x.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(positions, q, k, cos, sin, q_heads, k_heads, stride_qt, stride_qh,
                   stride_kt, stride_kh, dim, Q_HEADS_PAD: tl.constexpr,
                   K_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions + token).to(tl.int64)
    _rotate(q, token, position, cos, sin, q_heads, stride_qt, stride_qh, dim,
            Q_HEADS_PAD, HALF_PAD)
    _rotate(k, token, position, cos, sin, k_heads, stride_kt, stride_kh, dim,
            K_HEADS_PAD, HALF_PAD)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE in place on q [tokens, heads, dim] and k [tokens, kv_heads, dim]
    (strided views of the fused QKV output, dim the rotary part of each head); cos, sin:
    float32 [max_positions, dim]. Positions are the scheduler's, in range: no check that
    would wait for the device."""
    tokens, q_heads, dim = q.shape
    assert q.stride(2) == 1 and k.stride(2) == 1, "head dims must be contiguous"
    assert cos.shape[1] == dim and cos.is_contiguous() and sin.is_contiguous()
    if tokens:
        _rotary_kernel[(tokens,)](
            positions, q, k, cos, sin, q_heads, k.shape[1], q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), dim, Q_HEADS_PAD=triton.next_power_of_2(q_heads),
            K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
            HALF_PAD=triton.next_power_of_2(dim // 2))
