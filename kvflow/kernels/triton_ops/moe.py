"""Every expert of a layer in two launches, for CUDA, without reading the routing back to
the host: the shapes of the work depend only on the number of tokens, so a decode step of
a mixture-of-experts model can be captured in a CUDA graph.

A step's (token, expert) choices are sorted by expert on the device (`align`), each
expert's run padded to a whole number of BLOCK_M rows, and every block of rows tagged with
its expert. The grid covers the most blocks the choices could fill (each expert that has
rows wastes at most BLOCK_M - 1), and blocks past the last one return at once. The first
kernel multiplies a block's tokens by its expert's gate and up rows and applies the
activation; the second multiplies that by the expert's down rows and writes each choice's
output to its own row. The router's weights are applied and the top_k outputs summed in
float32 afterwards, as the PyTorch path does, so that a token's sum does not depend on
which tokens share its step. Both kernels round where the eager expert rounds (after each
product, bias and activation step), so that half-precision results match eager ones.

The function takes the native CPU kernel's arguments (kvflow/kernels/csrc/cpu_ops.cpp,
`moe_experts`), so that a FusedMoE takes it through its kernel hook; the CPU loop's
choices (GEMV rows, streams, prefetch, int8 activation sums) mean nothing here, and
quantized experts are turned down (the layer keeps its PyTorch path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.kernels.triton_ops import interpreting
from kvflow.kernels.triton_ops.glue import rounded
from kvflow.layers.moe import combine_choices

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "clamped_swiglu": 2}
BLOCK_M = 16  # tl.dot's smallest tile: a decode step's lone token per expert fills one row


def align(ids: torch.Tensor, num_experts: int, block_m: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [tokens, top_k] -> (each padded row's choice, an index into ids.flatten(), or
    ids.numel() for a padding row; each block's expert, -1 past the last block). Device
    operations only, their sizes set by ids' shape."""
    flat = ids.flatten()
    choices = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    first = torch.cumsum(counts, 0) - counts
    # at most min(experts, choices) experts have rows, each wasting under a block
    capacity = choices + min(num_experts, choices) * (block_m - 1)
    capacity = (capacity + block_m - 1) // block_m * block_m
    expert_of_row = flat[order]
    rank = torch.arange(choices, device=ids.device) - first[expert_of_row]
    rows = torch.full((capacity,), choices, dtype=torch.int64, device=ids.device)
    rows[padded_end[expert_of_row] - padded[expert_of_row] + rank] = order
    block_starts = torch.arange(0, capacity, block_m, device=ids.device)
    experts = torch.searchsorted(padded_end, block_starts, right=True)
    return rows, torch.where(experts < num_experts, experts, -1)


@triton.jit
def _block_rows(rows, block_experts, num_choices, BLOCK_M: tl.constexpr):
    """This program's block: its expert (-1 past the last block), its padded rows, the
    choice each holds and which hold one."""
    block = tl.program_id(0)
    expert = tl.load(block_experts + block).to(tl.int64)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    choice = tl.load(rows + offs_m)
    return expert, offs_m, choice, choice < num_choices


@triton.jit
def _gate_up_kernel(out, x, w, bias, rows, block_experts, num_choices, top_k, hidden, inner,
                    alpha, limit, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    expert, offs_m, choice, valid = _block_rows(rows, block_experts, num_choices, BLOCK_M)
    if expert < 0:
        return
    token = tl.where(valid, choice // top_k, 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inner
    gate_rows = w + expert * 2 * inner * hidden + offs_n.to(tl.int64) * hidden
    up_rows = gate_rows + inner * hidden
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        a = tl.load(x + token[:, None] * hidden + offs_k[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = n_mask[:, None] & k_mask[None, :]
        gate += tl.dot(a, tl.trans(tl.load(gate_rows[:, None] + offs_k[None, :], mask=w_mask,
                                           other=0.0)), input_precision=PRECISION)
        up += tl.dot(a, tl.trans(tl.load(up_rows[:, None] + offs_k[None, :], mask=w_mask,
                                         other=0.0)), input_precision=PRECISION)
    if HAS_BIAS:  # added before the product is rounded, as F.linear adds it
        row_bias = bias + expert * 2 * inner + offs_n
        gate += tl.load(row_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        up += tl.load(row_bias + inner, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    gate = rounded(gate, x)
    up = rounded(up, x)
    if ACTIVATION == 0:  # silu(gate) * up
        h = rounded(rounded(gate / (1.0 + tl.exp(-gate)), x) * up, x)
    elif ACTIVATION == 1:  # gelu with tanh(gate) * up
        inside = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        tanh = 2.0 / (1.0 + tl.exp(-2.0 * inside)) - 1.0
        h = rounded(rounded(0.5 * gate * (1.0 + tanh), x) * up, x)
    else:  # gpt-oss: (clamp(up) + 1) * gate * sigmoid(alpha * gate), gate clamped above
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        glu = rounded(gate * rounded(1.0 / (1.0 + tl.exp(-rounded(gate * alpha, x))), x), x)
        h = rounded(rounded(up + 1.0, x) * glu, x)
    tl.store(out + offs_m.to(tl.int64)[:, None] * inner + offs_n[None, :],
             h.to(out.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(out, h, w, bias, rows, block_experts, num_choices, hidden, inner,
                 HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert, offs_m, choice, valid = _block_rows(rows, block_experts, num_choices, BLOCK_M)
    if expert < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    w_rows = w + expert * hidden * inner + offs_n.to(tl.int64) * inner
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, inner, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < inner
        a = tl.load(h + offs_m.to(tl.int64)[:, None] * inner + offs_k[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(tl.load(w_rows[:, None] + offs_k[None, :],
                                          mask=n_mask[:, None] & k_mask[None, :], other=0.0)),
                      input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + expert * hidden + offs_n, mask=n_mask, other=0.0).to(
            tl.float32)[None, :]
    tl.store(out + choice.to(tl.int64)[:, None] * hidden + offs_n[None, :],
             acc.to(out.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def _tile(size: int, largest: int) -> int:
    return max(16, min(largest, triton.next_power_of_2(size)))


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                gate_up: torch.Tensor, gate_up_scales: torch.Tensor | None,
                gate_up_bias: torch.Tensor | None, down: torch.Tensor,
                down_scales: torch.Tensor | None, down_bias: torch.Tensor | None,
                activation: str, alpha: float, limit: float, gemv_max_rows: int = 0,
                streams: int = 0, prefetch: int = 0, gate_up_sums: torch.Tensor | None = None,
                down_sums: torch.Tensor | None = None) -> torch.Tensor:
    """x [tokens, hidden]; the router's weights (float32) and ids [tokens, top_k]; gate_up
    [experts, 2 * inner, hidden] (gate's rows, then up's), down [experts, hidden, inner], in
    x's dtype; biases [experts, rows] or None -> [tokens, hidden]."""
    if gate_up_scales is not None or down_scales is not None:
        raise RuntimeError("the Triton expert kernel takes experts in the activations' "
                           "dtype, not quantized ones")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton expert kernel runs on CUDA, not {x.device.type}")
    if activation not in ACTIVATIONS:
        raise RuntimeError(f"the Triton expert kernel has no activation {activation!r}")
    tokens, top_k = ids.shape
    num_experts, two_inner, hidden = gate_up.shape
    inner = two_inner // 2
    x = x.contiguous()
    out = x.new_empty(tokens * top_k, hidden)
    if tokens:
        rows, block_experts = align(ids, num_experts, BLOCK_M)
        # float32 models multiply in float32, as PyTorch does by default (not TF32)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        h = x.new_empty(rows.numel(), inner)
        blocks = block_experts.numel()
        block_n, block_k = _tile(inner, 64), _tile(hidden, 64)
        _gate_up_kernel[(blocks, triton.cdiv(inner, block_n))](
            h, x, gate_up, gate_up if gate_up_bias is None else gate_up_bias, rows,
            block_experts, tokens * top_k, top_k, hidden, inner, alpha, limit,
            ACTIVATION=ACTIVATIONS[activation], HAS_BIAS=gate_up_bias is not None,
            PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)
        block_n, block_k = _tile(hidden, 64), _tile(inner, 64)
        _down_kernel[(blocks, triton.cdiv(hidden, block_n))](
            out, h, down, down if down_bias is None else down_bias, rows, block_experts,
            tokens * top_k, hidden, inner, HAS_BIAS=down_bias is not None,
            PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)
    return combine_choices(out, weights, x.dtype)  # as the PyTorch path sums them
