"""A Hugging Face config.json as the few fields kvflow's model code needs.

`ModelConfig.from_pretrained` reads the checkpoint's config through transformers and
normalises it once, so model files never probe for optional keys. Both the older keys hub
checkpoints carry (`rope_theta`, `rope_scaling`, `torch_dtype`) and the newer ones
transformers 5 writes (`rope_parameters`, `dtype`) are read.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvflow.config import parse_dtype
from kvflow.quantization.gptq_awq import CheckpointQuantization, read_checkpoint_quantization

_SUPPORTED_ACTS = ("silu",)


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    scaling_type: str = "default"  # default | linear | llama3 | factors
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # "factors": a divisor per inverse frequency (head_dim / 2), as a GGUF file's
    # rope_freqs tensor holds Llama 3.1's scaling, computed by llama.cpp's converter
    frequency_factors: tuple[float, ...] = ()


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _read_rope(hf: Any) -> RopeConfig:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if params and "rope_theta" not in params and isinstance(next(iter(params.values())), dict):
        raise ValueError("per-layer rope_parameters are not supported")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    return RopeConfig(
        theta=float(theta),
        scaling_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf.max_position_embeddings)
        ),
    )


def _read_sliding_windows(hf: Any, architecture: str, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    if not window:
        return (None,) * num_layers
    layer_types = getattr(hf, "layer_types", None)
    if architecture == "MistralForCausalLM" or not layer_types:
        return (int(window),) * num_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def _read_eos_ids(path: Path, hf: Any) -> tuple[int, ...]:
    ids: list[int] = []
    gen_path = path / "generation_config.json"
    candidates: list[Any] = [getattr(hf, "eos_token_id", None)]
    if gen_path.exists():
        candidates.insert(0, json.loads(gen_path.read_text()).get("eos_token_id"))
    for value in candidates:
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return tuple(ids)


@dataclass(frozen=True)
class ModelConfig:
    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    checkpoint_dtype: torch.dtype
    eos_token_ids: tuple[int, ...] = field(default=())
    quantization: CheckpointQuantization | None = None  # a GPTQ or AWQ checkpoint's format

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        from transformers import AutoConfig

        from kvflow.models.gguf import GgufFile, is_gguf
        from kvflow.models.gguf.config import gguf_model_config
        from kvflow.models.registry import architecture_traits

        if is_gguf(path):
            return gguf_model_config(GgufFile(path))
        hf = AutoConfig.from_pretrained(str(path))
        architectures = getattr(hf, "architectures", None) or []
        if not architectures:
            raise ValueError(f"{path}/config.json names no architecture")
        architecture = architectures[0]
        traits = architecture_traits(architecture, hf)
        act = getattr(hf, "hidden_act", "silu")
        if act not in _SUPPORTED_ACTS:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: {_SUPPORTED_ACTS}")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        raw_dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "float32"
        return cls(
            path=str(path),
            architecture=architecture,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope=_read_rope(hf),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=traits.qkv_bias,
            o_bias=traits.o_bias,
            mlp_bias=traits.mlp_bias,
            qk_norm=traits.qk_norm,
            sliding_windows=_read_sliding_windows(hf, architecture, hf.num_hidden_layers),
            checkpoint_dtype=parse_dtype(raw_dtype),
            eos_token_ids=_read_eos_ids(Path(path), hf),
            quantization=read_checkpoint_quantization(getattr(hf, "quantization_config", None)),
        )

    def default_dtype(self, device: torch.device) -> torch.dtype:
        """dtype="auto": the checkpoint's, except that a GPTQ or AWQ checkpoint's fp16 runs
        in bf16 on the CPU, where kvflow's kernels take bf16 and float32 but not fp16 (vLLM
        also runs fp16 models in bf16 on the CPU)."""
        if (device.type == "cpu" and self.quantization is not None
                and self.checkpoint_dtype == torch.float16):
            return torch.bfloat16
        return self.checkpoint_dtype

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize
