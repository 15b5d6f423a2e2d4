"""Rotary position embeddings (rotate-half layout) with default, linear, llama3, LongRoPE
and YaRN scaling, or explicit per-frequency factors (GGUF's rope_freqs), over all of a head
or its leading rotary_dim dims (partial rotary)."""
from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from kvflow.layers.native import NativeKernelHook
from kvflow.models.config import RopeConfig


def inverse_frequencies(head_dim: int, rope: RopeConfig, max_positions: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if rope.scaling_type == "longrope":
        return 1.0 / (torch.tensor(_longrope_factors(rope, head_dim, max_positions)) * rope.theta ** exponents)
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.scaling_type == "linear":
        return inv_freq / rope.factor
    if rope.scaling_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    if rope.scaling_type == "yarn":
        return _yarn_scaled(rope.theta ** exponents, rope, head_dim)
    if rope.scaling_type == "factors":
        return inv_freq / torch.tensor(rope.frequency_factors, dtype=torch.float32)
    return inv_freq


def _longrope_factors(rope: RopeConfig, rotary_dim: int,
                      max_positions: int) -> tuple[float, ...]:
    """LongRoPE's long factors where the context may pass the length the model was trained
    at, its short ones otherwise. Transformers switches per sequence, recomputing every
    key once a sequence grows past that length; a paged cache keeps keys, so kvflow (as
    vLLM and llama.cpp do) chooses once, by the context it serves."""
    long = max_positions > rope.original_max_position_embeddings
    factors = rope.long_factors if long else rope.short_factors
    if len(factors) * 2 != rotary_dim:
        raise ValueError(f"LongRoPE {'long' if long else 'short'}_factor has {len(factors)} "
                         f"values; a rotary of {rotary_dim} dims needs {rotary_dim // 2}")
    return factors


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between blended.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_scaled(wavelengths: torch.Tensor, rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    """wavelengths: theta ** (2i / dim) (over 2 pi). YaRN: frequencies that turn fewer than
    beta_slow times over the trained context are divided by `factor`, those that turn more
    than beta_fast times kept, and the band between blended linearly by dimension."""

    def dimension(rotations: float) -> float:  # the dim whose frequency turns that often
        turns = rope.original_max_position_embeddings / (rotations * 2 * math.pi)
        return rotary_dim * math.log(turns) / (2 * math.log(rope.theta))

    low, high = dimension(rope.beta_fast), dimension(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # transformers' order of operations, so that float32 rounds alike
    return 1.0 / (rope.factor * wavelengths) * (1 - kept) + 1.0 / wavelengths * kept


class RotaryEmbedding(nn.Module, NativeKernelHook):
    kernel_ops = ("rotary_embedding",)

    def __init__(self, rotary_dim: int, max_positions: int, rope: RopeConfig) -> None:
        """rotary_dim: the leading dims of each head that turn (the head size unless the
        rotary is partial)."""
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = inverse_frequencies(rotary_dim, rope, max_positions)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        # [max_positions, rotary_dim]; LongRoPE scales both by its attention factor
        self.register_buffer("cos", angles.cos() * rope.attention_factor, persistent=False)
        self.register_buffer("sin", angles.sin() * rope.attention_factor, persistent=False)
        self.native: ModuleType | None = None

    def attach_native(self, ops: ModuleType) -> bool:
        self.native = ops
        return True

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]. The native kernel
        rotates them in place (views of the fused QKV output, which nothing reads after);
        the eager path returns new tensors."""
        dim = self.rotary_dim
        if self.native is not None:
            self.native.rotary_embedding(positions, q[..., :dim], k[..., :dim], self.cos,
                                         self.sin)
            return q, k
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        if dim == q.shape[-1]:
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return tuple(torch.cat((x[..., :dim] * cos + _rotate_half(x[..., :dim]) * sin,
                                x[..., dim:]), dim=-1) for x in (q, k))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
