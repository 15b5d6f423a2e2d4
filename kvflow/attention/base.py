"""The interface every attention backend implements.

A backend owns the layout of the KV cache it reads (`kv_cache_shapes`), the metadata it
needs, built once per step from the scheduled batch (`build_metadata`), writing keys and
values to their slots and reading a request's context back (`write_kv`, `gather_context`,
in its layout), and the attention itself (`forward`, which writes the step's keys and
values first). Every backend handles any mix of prefill chunks, decodes and short
multi-token queries (speculative verification) in one step. The model only ever calls
`PagedAttention.forward`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from kvflow.attention.metadata import AttentionMetadata, build_metadata

if TYPE_CHECKING:
    from kvflow.layers.attention import PagedAttention
    from kvflow.layers.rotary import RotaryEmbedding


class AttentionBackend(ABC):
    name: ClassVar[str]
    # Requests with at most this many query tokens are batched into one call.
    max_batched_query_len: ClassVar[int] = 16
    # A decode step through this backend can be captured (a CUDA graph, or the CPU's
    # recorded kernel calls): it reads the step only through the metadata's tensors, with
    # no host sync, no host-to-device copy and no shape that depends on the data in it.
    capturable: ClassVar[bool] = False

    @staticmethod
    def kv_cache_shapes(num_blocks: int, num_kv_heads: int, block_size: int,
                        head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of one layer's K and V caches (equal sizes). Head-major blocks by
        default, [num_blocks, num_kv_heads, block_size, head_dim]: one head's keys for a
        block are contiguous."""
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        return shape, shape

    def write_kv(self, layer: PagedAttention, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """k, v: [num_tokens, num_kv_heads, head_dim] written to their slots of the
        head-major caches."""
        block_size = layer.k_cache.shape[2]
        blocks = slot_mapping // block_size
        offsets = slot_mapping % block_size
        layer.k_cache[blocks, :, offsets] = k
        layer.v_cache[blocks, :, offsets] = v

    def gather_context(self, layer: PagedAttention, block_table: torch.Tensor,
                       seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's first seq_len keys and values, [num_kv_heads, seq_len, head_dim]
        each, copied out of the cache (for SDPA over a prefill chunk)."""
        return (gather_blocks(layer.k_cache, block_table)[:, :seq_len],
                gather_blocks(layer.v_cache, block_table)[:, :seq_len])

    def build_metadata(self, query_lens: list[int], num_computed: list[int],
                       block_tables: torch.Tensor, block_size: int,
                       device: torch.device) -> AttentionMetadata:
        return build_metadata(query_lens, num_computed, block_tables, block_size, device,
                              self.max_batched_query_len)

    def forward_rotary(self, layer: PagedAttention, rotary: RotaryEmbedding, q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """forward, with q and k rotated first by `rotary` at the step's positions. A
        backend may fuse the rotation into its KV write (one pass over k, one launch)."""
        q, k = rotary(meta.positions, q, k)
        return self.forward(layer, q, k, v, meta)

    @abstractmethod
    def forward(self, layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        -> [num_tokens, num_heads, head_dim]. Writes every request's k and v to their slots
        before any request attends: the prefix cache lets a request read blocks that
        another request of the same step fills (core/kv_manager.py)."""


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Head-major cache, [..., num_blocks] block ids -> [num_kv_heads, ...,
    num_blocks * block_size, head_dim].

    Indexing a head-first view gathers straight into head-major order: one copy, no
    transpose afterwards.
    """
    gathered = cache.transpose(0, 1)[:, block_table]  # [H, ..., nb, bs, D], contiguous
    return gathered.flatten(-3, -2)
