"""Which Hugging Face architectures kvflow runs, and what sets them apart.

Llama, Mistral, Qwen2 and Qwen3 share one decoder; they differ in biases, Qwen3's
per-head q/k RMSNorm and Mistral's sliding window (read in config.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchitectureTraits:
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool


def _llama(hf: Any) -> ArchitectureTraits:
    bias = bool(getattr(hf, "attention_bias", False))
    return ArchitectureTraits(qkv_bias=bias, o_bias=bias,
                              mlp_bias=bool(getattr(hf, "mlp_bias", False)), qk_norm=False)


def _qwen2(hf: Any) -> ArchitectureTraits:
    return ArchitectureTraits(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)


def _qwen3(hf: Any) -> ArchitectureTraits:
    bias = bool(getattr(hf, "attention_bias", False))
    return ArchitectureTraits(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)


def _mistral(hf: Any) -> ArchitectureTraits:
    return ArchitectureTraits(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)


_ARCHITECTURES = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
}

SUPPORTED_ARCHITECTURES = tuple(sorted(_ARCHITECTURES))


def architecture_traits(architecture: str, hf: Any) -> ArchitectureTraits:
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return _ARCHITECTURES[architecture](hf)
