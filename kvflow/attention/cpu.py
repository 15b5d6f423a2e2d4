"""The CPU backend: kvflow's native kernels (kvflow/kernels).

Every request of a step (decodes, short multi-token queries, prefill chunks) attends in
one kernel call that reads the paged cache in place, with no gather copy. A decode's long
context is split across threads and merged (flash-decoding); a prefill chunk is split into
tiles of 16 queries. On a 2-core Zen 5 this beat PyTorch's SDPA on prefill (2,048 fresh
tokens: 43 against 54 ms a layer; 512: 2.8 against 6.0 ms), and SDPA needs the context
gathered into a copy first.

The K cache is d-major inside a block, [num_blocks, num_kv_heads, head_dim, block_size]:
one head's keys for a block are still contiguous, and a row of the block holds one
dimension of all its keys, so the kernel's float32 path scores a query against a whole
block with broadcast FMAs and no horizontal sums. V stays [num_blocks, num_kv_heads,
block_size, head_dim], the order in which probabilities weight it. In bf16 on a CPU with
AVX512_BF16 the kernel repacks each 64-key chunk of both into pairs for vdpbf16ps GEMM
tiles instead (2.3x the earlier one-path kernel on a 512-token prefill, on Zen 4).
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

from kvflow.attention.base import AttentionBackend, gather_blocks
from kvflow.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from kvflow.layers.attention import PagedAttention


class CpuNativeBackend(AttentionBackend):
    name = "cpu"
    capturable = True  # one kernel call over the metadata's tensors (cpu_graphs.py)

    def __init__(self, ops: ModuleType, batch_invariant: bool = False) -> None:
        self.ops = ops
        # Flash-decoding's split of a long context changes a decode's arithmetic from the
        # one pass a prefill chunk's query makes over the same keys.
        self.split_context = not batch_invariant

    @staticmethod
    def kv_cache_shapes(num_blocks: int, num_kv_heads: int, block_size: int,
                        head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return ((num_blocks, num_kv_heads, head_dim, block_size),
                (num_blocks, num_kv_heads, block_size, head_dim))

    def write_kv(self, layer: PagedAttention, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        self.ops.write_kv(layer.k_cache, layer.v_cache, k, v, slot_mapping)

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
        self.ops.paged_attention(out, q, layer.k_cache, layer.v_cache, meta.block_tables,
                                 meta.seq_lens, meta.query_start_loc, layer.scale,
                                 layer.sliding_window or 0, self.split_context,
                                 layer.softcap or 0.0, layer.sinks)
        return out
