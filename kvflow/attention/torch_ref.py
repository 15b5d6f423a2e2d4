"""Paged attention in plain PyTorch: the reference path and the test oracle.

The KV cache of a layer is a pair of tensors [num_blocks, num_kv_heads, block_size,
head_dim]. Decodes are batched: every request's blocks are gathered through a padded
block table and masked by length. Each prefill chunk gathers its own request's blocks.
Sliding windows keep a key only if query_pos - key_pos < window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvflow.worker.forward_meta import ForwardMetadata, PrefillChunk


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] written to their slots."""
    block_size = k_cache.shape[2]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[..., num_blocks] block ids -> [num_kv_heads, ..., num_blocks * block_size, head_dim].

    Indexing a head-first view gathers straight into head-major order: one copy, no
    transpose afterwards.
    """
    gathered = cache.transpose(0, 1)[:, block_table]  # [H, ..., nb, bs, D], contiguous
    return gathered.flatten(-3, -2)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: ForwardMetadata, scale: float,
                    sliding_window: int | None) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[:meta.num_decodes] = _decode(q[:meta.num_decodes], k_cache, v_cache, meta, scale,
                                         sliding_window)
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        out[rows] = _prefill(q[rows], k_cache, v_cache, chunk, scale, sliding_window)
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            meta: ForwardMetadata, scale: float, sliding_window: int | None) -> torch.Tensor:
    # Explicit grouped matmuls: for one query token per request they are several times
    # faster on the CPU than SDPA's masked flash kernel, and need no repeated KV heads.
    keys = _gather(k_cache, meta.decode_block_tables)  # [H_kv, B, K, D]
    values = _gather(v_cache, meta.decode_block_tables)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[0]
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale  # [H_kv, B, G, K]
    key_pos = torch.arange(keys.shape[2], device=q.device)
    seq_lens = meta.decode_seq_lens[:, None]
    masked = key_pos[None, :] >= seq_lens  # [B, K]
    if sliding_window is not None:
        masked |= key_pos[None, :] < seq_lens - sliding_window
    scores.masked_fill_(masked[None, :, None, :], -float("inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values)  # [H_kv, B, G, D]
    return out.transpose(0, 1).reshape(batch, num_heads, head_dim)


def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             chunk: PrefillChunk, scale: float, sliding_window: int | None) -> torch.Tensor:
    context_len = chunk.context_len
    keys = _gather(k_cache, chunk.block_table)[:, :context_len].unsqueeze(0)
    values = _gather(v_cache, chunk.block_table)[:, :context_len].unsqueeze(0)
    query = q.transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
    if chunk.num_computed_tokens == 0 and sliding_window is None:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        q_pos = torch.arange(chunk.num_computed_tokens, context_len, device=q.device)[:, None]
        k_pos = torch.arange(context_len, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)
