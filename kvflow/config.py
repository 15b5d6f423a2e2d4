"""Engine configuration: one frozen dataclass per concern, normalised once at start-up.

`ModelConfig.from_pretrained` reads a Hugging Face config.json through transformers and
turns it into the few fields our model code needs, so model files never probe for
optional keys. Both the older keys hub checkpoints carry (`rope_theta`, `rope_scaling`,
`torch_dtype`) and the newer ones transformers 5 writes (`rope_parameters`, `dtype`) are read.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ByteSize, TypeAdapter, ValidationError

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

_SUPPORTED_ACTS = ("silu",)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"dtype {name} is not supported; use one of {sorted(_DTYPES)}")
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[key]


_BYTE_SIZE = TypeAdapter(ByteSize)


def parse_memory(value: int | float | str, name: str = "kv_cache_memory") -> int:
    """Bytes from a number or a string such as "2GiB", "512MiB" or "1.5GB" (pydantic's
    ByteSize: KB, MB, GB are powers of 1000, KiB, MiB, GiB of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size, got {value!r}")
    if isinstance(value, (int, float)):
        size = int(value)
    else:
        try:
            size = int(_BYTE_SIZE.validate_python(value))
        except ValidationError:
            raise ValueError(f"{name}={value!r} is not a size; use bytes or a string like "
                             "'2GiB'") from None
    if size <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return size


_TOKEN_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20,
                "G": 2**30}


def parse_token_count(value: int | str, name: str = "max_model_len") -> int:
    """A token count from an int or vLLM's human-readable form: "32k" is 32,000, "32K" is
    32,768, "1m" is 1,000,000, "25.6k" is 25,600."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a token count, got {value!r}")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgKMG]?)\s*", str(value))
    if not match:
        raise ValueError(f"{name}={value!r} is not a token count; use an integer or a form "
                         "like '32k' (x1000) or '32K' (x1024)")
    count = float(match.group(1)) * _TOKEN_UNITS[match.group(2)]
    if count != int(count):
        raise ValueError(f"{name}={value!r} is not a whole number of tokens")
    return int(count)


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    scaling_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        from transformers import AutoConfig

        from kvflow.models.registry import architecture_traits

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
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


# fcfs: arrival order; priority: lower `priority` value first, then arrival; lpm: longest
# cached prefix first, aged so that no request waits for ever (core/scheduler.py).
SCHEDULING_POLICIES = ("fcfs", "priority", "lpm")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    policy: str = "fcfs"  # one of SCHEDULING_POLICIES

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}"
            )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_blocks: int  # including the null block 0, which is never handed out

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_tokens(self) -> int:
        """Tokens the pool holds in all."""
        return self.num_usable_blocks * self.block_size
