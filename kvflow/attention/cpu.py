"""The CPU backend: kvflow's native kernels (kvflow/kernels).

Short queries (decodes, speculative verification) attend in one kernel call that reads
the paged cache in place, with no gather copy, and splits long contexts across threads.
Longer prefill chunks go through PyTorch's SDPA; a chunk that starts at position 0 attends
over its own keys and values, so nothing is read back from the cache.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.attention.metadata import AttentionMetadata
from kvflow.attention.torch_ref import chunk_attention

if TYPE_CHECKING:
    from kvflow.layers.attention import PagedAttention


class CpuNativeBackend(AttentionBackend):
    name = "cpu"

    def __init__(self, ops: ModuleType) -> None:
        self.ops = ops

    def forward(self, layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self.ops.write_kv(layer.k_cache, layer.v_cache, k, v, meta.slot_mapping)
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
            own = (k[rows], v[rows]) if query_len == seq_len else (None, None)
            out[rows] = chunk_attention(q[rows], layer, meta.block_tables[req], seq_len, *own)
            start = rows.stop
        return out
