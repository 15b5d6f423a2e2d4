"""The CPU backend: kvflow's native kernels (kvflow/kernels).

Short queries (decodes, speculative verification) attend in one kernel call that reads
the paged cache in place, with no gather copy, and splits long contexts across threads.
Longer prefill chunks go through PyTorch's SDPA; a chunk that starts at position 0 attends
over its own keys and values, so nothing is read back from the cache.

The K cache is d-major inside a block, [num_blocks, num_kv_heads, head_dim, block_size]:
one head's keys for a block are still contiguous, and a row of the block holds one
dimension of all its keys, so the kernel scores a query against a whole block with
broadcast FMAs and no horizontal sums. V stays [num_blocks, num_kv_heads, block_size,
head_dim], the order in which probabilities weight it.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

from kvflow.attention.base import AttentionBackend, gather_blocks
from kvflow.attention.metadata import AttentionMetadata
from kvflow.attention.torch_ref import chunk_attention

if TYPE_CHECKING:
    from kvflow.layers.attention import PagedAttention


class CpuNativeBackend(AttentionBackend):
    name = "cpu"
    max_batched_query_len = 1 << 30  # the kernel takes prefill chunks too: one call per step

    def __init__(self, ops: ModuleType) -> None:
        self.ops = ops

    @staticmethod
    def kv_cache_shapes(num_blocks: int, num_kv_heads: int, block_size: int,
                        head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return ((num_blocks, num_kv_heads, head_dim, block_size),
                (num_blocks, num_kv_heads, block_size, head_dim))

    def write_kv(self, layer: PagedAttention, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        self.ops.write_kv(layer.k_cache, layer.v_cache, k, v, slot_mapping, True)

    def gather_context(self, layer: PagedAttention, block_table: torch.Tensor,
                       seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = layer.k_cache.transpose(0, 1)[:, block_table]  # [H, nb, D, bs]
        keys = keys.transpose(-1, -2).flatten(1, 2)[:, :seq_len]
        return keys, gather_blocks(layer.v_cache, block_table)[:, :seq_len]

    def forward(self, layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self.write_kv(layer, k, v, meta.slot_mapping)
        q = q.contiguous()
        out = torch.empty_like(q)
        num_short, start = meta.num_batched_reqs, meta.num_batched_tokens
        if num_short:
            self.ops.paged_attention(out[:start], q[:start], layer.k_cache, layer.v_cache,
                                     meta.block_tables[:num_short], meta.seq_lens[:num_short],
                                     meta.query_start_loc[:num_short + 1], layer.scale,
                                     layer.sliding_window or 0)
        for req in range(num_short, meta.num_reqs):
            query_len, seq_len = meta.query_lens_cpu[req], meta.seq_lens_cpu[req]
            rows = slice(start, start + query_len)
            if query_len == seq_len:  # the chunk's own keys are its whole context
                keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            else:
                keys, values = self.gather_context(layer, meta.block_tables[req], seq_len)
            out[rows] = chunk_attention(q[rows], layer, keys, values)
            start = rows.stop
        return out
