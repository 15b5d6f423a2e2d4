"""The Triton backend: CUDA's attention (kvflow/kernels/triton_ops/attention.py).

Every request of a step attends in one kernel launch that reads the paged cache in place:
no gathered copy of a context, no KV heads repeated for GQA, no per-request launches. The
cache keeps the default head-major layout, [num_blocks, num_kv_heads, block_size,
head_dim], whose rows (one key's dimensions) are what a tile loads. A step with few
programs and long contexts splits each context across programs (flash-decoding).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from kvflow.layers.attention import PagedAttention
    from kvflow.layers.rotary import RotaryEmbedding

# A split reads at least this many keys: below it, the merge costs more than it saves.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16


class TritonBackend(AttentionBackend):
    name = "triton"
    capturable = True

    def __init__(self, device: torch.device, batch_invariant: bool = False) -> None:
        # Imported here: Triton reads TRITON_INTERPRET when the kernels are defined.
        from kvflow.kernels.triton_ops import attention

        self.ops = attention
        # Programs enough to fill the device: two per SM on a GPU. The interpreter runs
        # programs one by one; its figure only makes CI split long contexts as a GPU would.
        self.target_programs = (2 * torch.cuda.get_device_properties(device).multi_processor_count
                                if device.type == "cuda" else 32)
        # A split changes the order in which a query's keys are summed.
        self.split_contexts = not batch_invariant

    def write_kv(self, layer: PagedAttention, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        self.ops.write_kv(k, v, layer.k_cache, layer.v_cache, slot_mapping)

    def forward_rotary(self, layer: PagedAttention, rotary: RotaryEmbedding, q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.ops.rope_and_write_kv(meta.positions, q, k, v, rotary.cos, rotary.sin,
                                   layer.k_cache, layer.v_cache, meta.slot_mapping)
        return self._attend(layer, q, meta)

    def forward(self, layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self.write_kv(layer, k, v, meta.slot_mapping)
        return self._attend(layer, q, meta)

    def _attend(self, layer: PagedAttention, q: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Every request's queries against the cache, their own keys written already."""
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        group = layer.num_heads // layer.num_kv_heads
        shape = self.ops.tile_shape(group, max(meta.query_lens_cpu), layer.head_dim)
        tiles = meta.derived.get(shape.block_q)
        if tiles is None:  # once per step, not per layer
            tiles = meta.derived[shape.block_q] = self.ops.query_tiles(
                meta.query_lens_cpu, shape.block_q, q.device)
        self.ops.paged_attention(out, q, layer.k_cache, layer.v_cache, meta.block_tables,
                                 meta.seq_lens, meta.query_start_loc, tiles, shape,
                                 self._splits(tiles[0].shape[0] * layer.num_kv_heads,
                                              max(meta.seq_lens_cpu)),
                                 layer.scale, layer.softcap, layer.sliding_window, layer.sinks)
        return out

    def _splits(self, programs: int, max_seq_len: int) -> int:
        """How many programs share each tile's keys: enough to fill the device, each
        reading at least MIN_KEYS_PER_SPLIT of the longest context."""
        if not self.split_contexts or programs >= self.target_programs:
            return 1
        return max(1, min(MAX_SPLITS, self.target_programs // programs,
                          max_seq_len // MIN_KEYS_PER_SPLIT))
