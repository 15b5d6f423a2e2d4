"""The attention layer the model calls: its shape, its KV cache and its backend."""
from __future__ import annotations

import torch
from torch import nn

from kvflow.attention.base import AttentionBackend
from kvflow.attention.metadata import AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None, scale: float | None = None,
                 softcap: float | None = None) -> None:
        """scale: the scores' factor (None: head_dim ** -0.5); softcap: scores become
        softcap * tanh(scores / softcap) before the softmax (Gemma 2)."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.softcap = softcap
        self.sliding_window = sliding_window
        # Bound by the model runner once the cache is allocated, in the backend's layout.
        self.backend: AttentionBackend | None = None
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def bind(self, backend: AttentionBackend, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> None:
        self.backend, self.k_cache, self.v_cache = backend, k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        assert self.backend is not None, "attention layer not bound to a KV cache"
        return self.backend.forward(self, q, k, v, meta)
