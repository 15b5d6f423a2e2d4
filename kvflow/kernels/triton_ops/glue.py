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
def rounded(x, like):
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
        value = rounded(value + tl.load(residual + row * dim + cols, mask=mask,
                                         other=0.0).to(tl.float32), x)
        tl.store(residual + row * dim + cols, value.to(residual.dtype.element_ty), mask=mask)
    normed = value / tl.sqrt(tl.sum(value * value, 0) / dim + eps)
    if not FLOAT_WEIGHT:  # eager: weight * x32.to(dtype); Gemma's: (x32 * weight).to(dtype)
        normed = rounded(normed, x)
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
    activated = rounded(gate * tl.sigmoid(gate), x)
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
def rotated(x, token, position, heads, stride_t, stride_h, cos, sin, rotary_dim,
             HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """One token's heads of x [HEADS_PAD, D_PAD] in float32, the first rotary_dim dims of
    each turned (rotate-half), rounded where eager's x * cos + rotate_half(x) * sin
    rounds; the rest as they are."""
    dims = tl.arange(0, D_PAD)
    half = rotary_dim // 2
    turning = dims < rotary_dim
    partner = tl.where(dims < half, dims + half, dims - half)
    sign = tl.where(dims < half, -1.0, 1.0)
    c = rounded(tl.load(cos + position * rotary_dim + dims, mask=turning, other=1.0), x)
    s = rounded(tl.load(sin + position * rotary_dim + dims, mask=turning, other=0.0), x)
    rows = tl.arange(0, HEADS_PAD)[:, None]
    mask = (rows < heads) & (dims < HEAD_DIM)[None, :]
    base = x + token * stride_t + rows * stride_h
    own = tl.load(base + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    other = tl.load(base + partner[None, :], mask=mask & turning[None, :],
                    other=0.0).to(tl.float32)
    return rounded(rounded(own * c[None, :], x)
                    + rounded(sign[None, :] * other * s[None, :], x), x)


@triton.jit
def _rotary_kernel(positions, q, k, cos, sin, q_heads, k_heads, stride_qt, stride_qh,
                   stride_kt, stride_kh, dim, Q_HEADS_PAD: tl.constexpr,
                   K_HEADS_PAD: tl.constexpr, D_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions + token).to(tl.int64)
    dims = tl.arange(0, D_PAD)[None, :]
    # both computed before either is stored: q and k may be views of one tensor
    new_q = rotated(q, token, position, q_heads, stride_qt, stride_qh, cos, sin, dim,
                    Q_HEADS_PAD, dim, D_PAD)
    new_k = rotated(k, token, position, k_heads, stride_kt, stride_kh, cos, sin, dim,
                    K_HEADS_PAD, dim, D_PAD)
    q_rows = tl.arange(0, Q_HEADS_PAD)[:, None]
    k_rows = tl.arange(0, K_HEADS_PAD)[:, None]
    tl.store(q + token * stride_qt + q_rows * stride_qh + dims, new_q.to(q.dtype.element_ty),
             mask=(q_rows < q_heads) & (dims < dim))
    tl.store(k + token * stride_kt + k_rows * stride_kh + dims, new_k.to(k.dtype.element_ty),
             mask=(k_rows < k_heads) & (dims < dim))


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
            D_PAD=triton.next_power_of_2(dim))
