"""Paged attention in plain PyTorch: the reference backend and the test oracle.

The KV cache of a layer is a pair of tensors [num_blocks, num_kv_heads, block_size,
head_dim]. Requests with short queries (decodes, speculative verification) are batched:
their blocks are gathered through the padded block table and masked by position. Each
longer prefill chunk gathers its own request's blocks for SDPA. Sliding windows keep a
key only if query_pos - key_pos < window. A soft cap (Gemma 2) bends the scores before the
softmax; a sink (gpt-oss) is one more logit per head in it, whose probability weights no
value.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvflow.attention.base import AttentionBackend, gather_blocks
from kvflow.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from kvflow.layers.attention import PagedAttention


class TorchRefBackend(AttentionBackend):
    name = "torch"

    def forward(self, layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self.write_kv(layer, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        num_short, start = meta.num_batched_reqs, meta.num_batched_tokens
        if num_short:
            out[:start] = short_queries(q[:start], layer, meta, num_short)
        for req in range(num_short, meta.num_reqs):
            rows = slice(start, start + meta.query_lens_cpu[req])
            keys, values = self.gather_context(layer, meta.block_tables[req],
                                               meta.seq_lens_cpu[req])
            out[rows] = chunk_attention(q[rows], layer, keys, values)
            start = rows.stop
        return out


def short_queries(q: torch.Tensor, layer: PagedAttention, meta: AttentionMetadata,
                  num_reqs: int) -> torch.Tensor:
    """The first num_reqs requests' queries in one batched call, padded to the longest.

    Explicit grouped matmuls: for a few query tokens per request they are several times
    faster on the CPU than SDPA's masked flash kernel, and need no repeated KV heads."""
    query_lens = meta.query_lens_cpu[:num_reqs]
    width = max(query_lens)
    num_tokens, num_heads, head_dim = q.shape
    device = q.device
    lens = torch.tensor(query_lens, device=device)
    row = torch.repeat_interleave(torch.arange(num_reqs, device=device), lens)
    starts = meta.query_start_loc[:num_reqs].long()
    within = torch.arange(num_tokens, device=device) - starts[row]
    padded = q.new_zeros(num_reqs * width, num_heads, head_dim)
    padded[row * width + within] = q
    keys = gather_blocks(layer.k_cache, meta.block_tables[:num_reqs])  # [H_kv, B, K, D]
    values = gather_blocks(layer.v_cache, meta.block_tables[:num_reqs])
    num_kv_heads = keys.shape[0]
    group = num_heads // num_kv_heads
    # [B, W, H_kv, G, D] -> [H_kv, B, W * G, D]
    grouped = padded.view(num_reqs, width, num_kv_heads, group, head_dim).permute(2, 0, 1, 3, 4)
    grouped = grouped.reshape(num_kv_heads, num_reqs, width * group, head_dim)
    scores = capped(torch.matmul(grouped, keys.transpose(-1, -2)).float() * layer.scale,
                    layer.softcap)
    scores = scores.view(num_kv_heads, num_reqs, width, group, -1)
    seq_lens = meta.seq_lens[:num_reqs].long()
    query_pos = (seq_lens - lens)[:, None] + torch.arange(width, device=device)[None, :]
    key_pos = torch.arange(keys.shape[2], device=device)
    masked = key_pos[None, None, :] > query_pos[:, :, None]  # [B, W, K]
    if layer.sliding_window is not None:
        masked |= key_pos[None, None, :] <= query_pos[:, :, None] - layer.sliding_window
    scores.masked_fill_(masked[None, :, :, None, :], -float("inf"))
    sinks = None if layer.sinks is None else layer.sinks.view(num_kv_heads, 1, 1, group, 1)
    probs = softmax_with_sinks(scores, sinks).to(values.dtype).flatten(2, 3)
    out = torch.matmul(probs, values)  # [H_kv, B, W * G, D]
    out = out.view(num_kv_heads, num_reqs, width, group, head_dim).permute(1, 2, 0, 3, 4)
    return out.reshape(num_reqs * width, num_heads, head_dim)[row * width + within]


def chunk_attention(q: torch.Tensor, layer: PagedAttention, keys: torch.Tensor,
                    values: torch.Tensor) -> torch.Tensor:
    """One request's chunk of queries, the last len(q) positions of its context, through
    SDPA. keys, values: the whole context, [num_kv_heads, seq_len, head_dim]."""
    query_len, seq_len = q.shape[0], keys.shape[1]
    num_computed = seq_len - query_len
    query = q.transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
    keys, values = keys.unsqueeze(0), values.unsqueeze(0)
    window = layer.sliding_window
    spelled_out = layer.softcap is not None or layer.sinks is not None
    if num_computed == 0 and window is None and not spelled_out:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True,
                                             scale=layer.scale, enable_gqa=True)
    else:
        q_pos = torch.arange(num_computed, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= q_pos - k_pos < window
        if not spelled_out:
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                                 scale=layer.scale, enable_gqa=True)
        else:  # SDPA has neither a cap on the scores nor sinks
            group = query.shape[1] // keys.shape[1]
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
            scores = capped(torch.matmul(query, keys.transpose(-1, -2)).float() * layer.scale,
                            layer.softcap)
            sinks = None if layer.sinks is None else layer.sinks.view(1, -1, 1, 1)
            probs = softmax_with_sinks(scores.masked_fill(~mask, -float("inf")), sinks)
            out = torch.matmul(probs.to(values.dtype), values)
    return out.squeeze(0).transpose(0, 1)


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's soft cap on attention scores: softcap * tanh(scores / softcap)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim, with each row's sink (broadcast to scores' shape but
    the last dim) as one more logit, left out of the result."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sinks = sinks.expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
