"""The attention layer the model calls: its shape, its KV cache and its backend."""
from __future__ import annotations

import torch
from torch import nn

from kvflow.attention.base import AttentionBackend
from kvflow.attention.metadata import AttentionMetadata
from kvflow.distributed.tensor_parallel import TensorParallel, current
from kvflow.layers.rotary import RotaryEmbedding
from kvflow.quantization.base import WeightLoader, add_parameter, checked_copy


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None, scale: float | None = None,
                 softcap: float | None = None, sinks: bool = False) -> None:
        """scale: the scores' factor (None: head_dim ** -0.5); softcap: scores become
        softcap * tanh(scores / softcap) before the softmax (Gemma 2); sinks: a learned
        logit per head joins every softmax's denominator and weights no value (gpt-oss's
        attention sinks, which let a head attend to nothing)."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.softcap = softcap
        self.sliding_window = sliding_window
        # float32 whatever the model's dtype: the backends add it to float32 scores
        self.sinks = (add_parameter(self, "sinks", torch.empty(num_heads, dtype=torch.float32),
                                    _heads_loader(current())) if sinks else None)
        # Bound by the model runner once the cache is allocated, in the backend's layout.
        self.backend: AttentionBackend | None = None
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def bind(self, backend: AttentionBackend, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> None:
        self.backend, self.k_cache, self.v_cache = backend, k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, rotary: RotaryEmbedding | None = None) -> torch.Tensor:
        """rotary: RoPE for q and k, applied before their keys are written (by the backend,
        which may fuse the two)."""
        assert self.backend is not None, "attention layer not bound to a KV cache"
        if rotary is None:
            return self.backend.forward(self, q, k, v, meta)
        return self.backend.forward_rotary(self, rotary, q, k, v, meta)


def _heads_loader(tp: TensorParallel) -> WeightLoader:
    """A per-head parameter's loader: this tensor-parallel rank's heads of the
    checkpoint's (ranks hold consecutive heads, as the q projection's rows)."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        heads = param.shape[0]
        checked_copy(param.data, loaded.narrow(0, tp.rank * heads, heads)
                     if loaded.shape[0] == heads * tp.size else loaded)

    return load
