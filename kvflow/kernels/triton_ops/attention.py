"""Paged attention in Triton: one kernel for every request of a step, reading the paged KV
cache in place.

A program takes one tile of a request's queries for one KV head: `block_q` consecutive
query tokens times the `group` query heads that share that KV head, as the rows of one
matrix, so that GQA reads each key once for all its heads and never repeats KV. It walks
the keys the tile can see (causal, inside a sliding window) `BLOCK_N` positions at a time,
each position's block looked up in the request's block table, with an online softmax.
Decodes, speculative verification's few queries and prefill chunks continuing from cached
blocks are all tiles of this one kernel.

When the step has too few tiles to fill the GPU and its contexts are long (few decodes),
each tile's keys are split across `num_splits` programs (flash-decoding): each writes its
part's output with its running max and sum, and a second kernel merges them. A sink
(gpt-oss) is one more logit per head in the softmax, whose probability weights no value:
it starts the running sum, or joins the merge.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvflow.kernels.triton_ops.glue import rotated


@triton.jit
def _write_kv_kernel(k, v, k_cache, v_cache, slot_mapping, num_tokens, block_size,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
                     NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    # A program writes BLOCK_T tokens, each token's heads and dimensions as one row.
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_mapping + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    columns = tl.arange(0, HEADS_PAD * D_PAD)
    heads = (columns // D_PAD)[None, :]
    dims = (columns % D_PAD)[None, :]
    # a negative slot is a padding token's: nothing to write
    mask = (slots >= 0)[:, None] & (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    block = (slots // block_size)[:, None]
    offset = (slots % block_size)[:, None]
    rows = tokens.to(tl.int64)[:, None]
    keys = tl.load(k + rows * stride_kt + heads * stride_kh + dims, mask=mask)
    values = tl.load(v + rows * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(k_cache + block * stride_kcb + heads * stride_kch + offset * stride_kcs + dims,
             keys, mask=mask)
    tl.store(v_cache + block * stride_vcb + heads * stride_vch + offset * stride_vcs + dims,
             values, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] into head-major caches [num_blocks,
    num_kv_heads, block_size, head_dim] at their slots (block * block_size + offset)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    for t in (k, v, k_cache, v_cache):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    heads_pad = triton.next_power_of_2(num_kv_heads)
    d_pad = triton.next_power_of_2(head_dim)
    block_t = max(1, min(16, 4096 // (heads_pad * d_pad)))
    _write_kv_kernel[(triton.cdiv(num_tokens, block_t),)](
        k, v, k_cache, v_cache, slot_mapping, num_tokens, k_cache.shape[2],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=heads_pad, HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_T=block_t)


@triton.jit
def _rope_write_kv_kernel(
        positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_size, rotary_dim,
        q_heads, kv_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
        Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions + token).to(tl.int64)
    dims = tl.arange(0, D_PAD)[None, :]
    q_rows = tl.arange(0, Q_HEADS_PAD)[:, None]
    rotated_q = rotated(q, token, position, q_heads, stride_qt, stride_qh, cos, sin,
                         rotary_dim, Q_HEADS_PAD, HEAD_DIM, D_PAD)
    tl.store(q + token * stride_qt + q_rows * stride_qh + dims,
             rotated_q.to(q.dtype.element_ty), mask=(q_rows < q_heads) & (dims < HEAD_DIM))
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot >= 0:  # a padding token's is negative: nothing to write
        rotated_k = rotated(k, token, position, kv_heads, stride_kt, stride_kh, cos, sin,
                             rotary_dim, KV_HEADS_PAD, HEAD_DIM, D_PAD)
        rows = tl.arange(0, KV_HEADS_PAD)[:, None]
        mask = (rows < kv_heads) & (dims < HEAD_DIM)
        block = slot // block_size
        offset = slot % block_size
        tl.store(k_cache + block * stride_kcb + rows * stride_kch + offset * stride_kcs + dims,
                 rotated_k.to(k_cache.dtype.element_ty), mask=mask)
        values = tl.load(v + token * stride_vt + rows * stride_vh + dims, mask=mask)
        tl.store(v_cache + block * stride_vcb + rows * stride_vch + offset * stride_vcs + dims,
                 values, mask=mask)


def rope_and_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """RoPE on q in place, and k rotated on its way into the cache with v beside it: one
    launch and one read of k where rotating and writing take two of each. q [tokens,
    heads, head_dim], k, v [tokens, kv_heads, head_dim] (strided views of the fused QKV
    output); cos, sin float32 [positions, rotary_dim], rotary_dim <= head_dim."""
    num_tokens, q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    for t in (q, k, v, k_cache, v_cache):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    assert cos.is_contiguous() and sin.is_contiguous()
    kv_heads = k.shape[1]
    _rope_write_kv_kernel[(num_tokens,)](
        positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_cache.shape[2],
        cos.shape[1], q_heads, kv_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Q_HEADS_PAD=triton.next_power_of_2(q_heads),
        KV_HEADS_PAD=triton.next_power_of_2(kv_heads), HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim))


@triton.jit
def _tanh(x):
    # tl has no tanh that the interpreter and every backend share; this form saturates to
    # +-1 where exp overflows or vanishes
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _attention_kernel(
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        tile_reqs, tile_starts, sinks, part_out, part_max, part_sum,
        scale, softcap, window, block_size, num_heads,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_bt,
        GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
        NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = tl.load(tile_reqs + tile)
    first_query = tl.load(tile_starts + tile)
    query_begin = tl.load(query_start_loc + req)
    query_len = tl.load(query_start_loc + req + 1) - query_begin
    seq_len = tl.load(seq_lens + req)
    num_computed = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    query = first_query + rows // GROUP  # within the request
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows // GROUP < BLOCK_Q) & (query < query_len)
    query_pos = num_computed + query
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    token = (query_begin + query).to(tl.int64)
    q_tile = tl.load(q + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # The keys this tile sees: causal up to its last query, from its first query's window.
    kv_stop = num_computed + tl.minimum(first_query + BLOCK_Q, query_len)
    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(num_computed + first_query - window + 1, 0)
    if NUM_SPLITS > 1:
        span = tl.cdiv(tl.cdiv(kv_stop - kv_start, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_start = kv_start + split * span
        kv_stop = tl.minimum(kv_start + span, kv_stop)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS and NUM_SPLITS == 1:
        running_max = tl.load(sinks + head, mask=row_ok, other=float("-inf")).to(tl.float32)
        running_sum = tl.where(row_ok, 1.0, 0.0)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = block_tables + req.to(tl.int64) * stride_bt
    for start in range(kv_start, kv_stop, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < kv_stop
        block = tl.load(table + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
        offset = pos % block_size
        keys = tl.load(k_cache + block[None, :] * stride_kb + kv_head * stride_kh
                       + offset[None, :] * stride_ks + dims[:, None],
                       mask=pos_ok[None, :] & dim_ok[:, None], other=0.0)  # [D, N]
        scores = tl.dot(q_tile, keys, input_precision=PRECISION) * scale
        if HAS_SOFTCAP:
            scores = softcap * _tanh(scores / softcap)
        seen = pos_ok[None, :] & (pos[None, :] <= query_pos[:, None])
        if HAS_WINDOW:
            seen = seen & (query_pos[:, None] - pos[None, :] < window)
        scores = tl.where(seen, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # a row that has seen nothing yet keeps -inf; exp(-inf - 0) keeps it at zero weight
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp(scores - shift[:, None])
        rescale = tl.exp(running_max - shift)
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        values = tl.load(v_cache + block[:, None] * stride_vb + kv_head * stride_vh
                         + offset[:, None] * stride_vs + dims[None, :],
                         mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)  # [N, D]
        acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values,
                                              input_precision=PRECISION)
        running_max = new_max

    result = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    store_mask = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(out + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 result.to(out.dtype.element_ty), mask=store_mask)
    else:  # parts: [num_tokens, num_heads, NUM_SPLITS] (, HEAD_DIM)
        part = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_out + part[:, None] * HEAD_DIM + dims[None, :], result, mask=store_mask)
        tl.store(part_max + part, running_max, mask=row_ok)
        tl.store(part_sum + part, running_sum, mask=row_ok)


@triton.jit
def _merge_kernel(out, sinks, part_out, part_max, part_sum, stride_ot, stride_oh,
                  num_heads, HAS_SINKS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    parts = (token * num_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    maxes = tl.load(part_max + parts)
    sums = tl.load(part_sum + parts)
    top = tl.max(maxes, 0)
    if HAS_SINKS:
        sink = tl.load(sinks + head).to(tl.float32)
        top = tl.maximum(top, sink)
    weights = tl.where(sums > 0, sums * tl.exp(maxes - top), 0.0)
    total = tl.sum(weights, 0)
    if HAS_SINKS:
        total += tl.exp(sink - top)
    dims = tl.arange(0, D_PAD)
    values = tl.load(part_out + parts[:, None] * HEAD_DIM + dims[None, :],
                     mask=dims[None, :] < HEAD_DIM, other=0.0)
    merged = tl.sum(values * weights[:, None], 0) / total
    tl.store(out + token * stride_ot + head * stride_oh + dims,
             merged.to(out.dtype.element_ty), mask=dims < HEAD_DIM)


@dataclass(frozen=True)
class TileShape:
    """How one call cuts queries into programs: rows = block_q tokens x the GQA group."""

    block_q: int
    block_m: int
    block_n: int


def tile_shape(group: int, max_query_len: int, head_dim: int) -> TileShape:
    """Rows for a decode-only step: one token's heads (tl.dot takes at least 16 rows).
    With longer queries, 64 rows, so that a prefill chunk's keys are read once per 64
    query rows. Fewer keys per step where a head is wide, for the tiles' registers."""
    rows = max(16, triton.next_power_of_2(group))
    if max_query_len > 1:
        rows = max(rows, 64)
    return TileShape(block_q=rows // group, block_m=rows, block_n=64 if head_dim <= 128 else 32)


def query_tiles(query_lens: list[int], block_q: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each program's request and first query in it, request after request. Where every
    request has as many queries (decodes; a graphed verification step) they are made on
    the device, so that a CUDA graph can capture them."""
    if min(query_lens) == max(query_lens):
        per_request = triton.cdiv(query_lens[0], block_q)
        reqs = torch.arange(len(query_lens), dtype=torch.int32, device=device)
        starts = torch.arange(0, per_request * block_q, block_q, dtype=torch.int32,
                              device=device)
        return (reqs.repeat_interleave(per_request), starts.repeat(len(query_lens)))
    reqs: list[int] = []
    starts: list[int] = []
    for req, query_len in enumerate(query_lens):
        first = range(0, query_len, block_q)
        reqs.extend([req] * len(first))
        starts.extend(first)
    return (torch.tensor(reqs, dtype=torch.int32).to(device, non_blocking=True),
            torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True))


def paged_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, tiles: tuple[torch.Tensor, torch.Tensor],
                    shape: TileShape, num_splits: int, scale: float, softcap: float | None,
                    window: int | None, sinks: torch.Tensor | None) -> None:
    """q, out: [num_tokens, num_heads, head_dim]; caches head-major [num_blocks,
    num_kv_heads, block_size, head_dim]; tiles: query_tiles(...) for shape.block_q."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    assert shape.block_q * group <= shape.block_m
    for t in (q, out, k_cache, v_cache):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    num_splits = triton.next_power_of_2(num_splits)
    if num_splits > 1:
        part_out = torch.empty(num_tokens, num_heads, num_splits, head_dim,
                               dtype=torch.float32, device=q.device)
        part_max = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out  # not read
    d_pad = max(16, triton.next_power_of_2(head_dim))
    grid = (tiles[0].shape[0], num_kv_heads, num_splits)
    _attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        tiles[0], tiles[1], q if sinks is None else sinks, part_out, part_max, part_sum,
        scale, softcap or 1.0, window or 0, k_cache.shape[2], num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_Q=shape.block_q, BLOCK_M=shape.block_m, BLOCK_N=shape.block_n,
        HEAD_DIM=head_dim, D_PAD=d_pad, HAS_SOFTCAP=softcap is not None,
        HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None, NUM_SPLITS=num_splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if num_splits > 1:
        _merge_kernel[(num_tokens, num_heads)](
            out, q if sinks is None else sinks, part_out, part_max, part_sum,
            out.stride(0), out.stride(1), num_heads, HAS_SINKS=sinks is not None,
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, D_PAD=d_pad)
