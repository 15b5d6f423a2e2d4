"""The engine's own configuration: one frozen dataclass per concern (scheduler, cache),
and the parsers of the values users give (dtypes, sizes, token counts). The model's
configuration, read from a checkpoint, is kvflow.models.config."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
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

def parse_json_object(value: str | Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """An option that is a JSON object: text on the command line, a dict from Python.
    Raises ValueError naming the option."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


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


# fcfs: arrival order; priority: lower `priority` value first, then arrival; lpm: longest
# cached prefix first, aged so that no request waits for ever (core/scheduler.py).
SCHEDULING_POLICIES = ("fcfs", "priority", "lpm")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    policy: str = "fcfs"  # one of SCHEDULING_POLICIES
    # KV slots a sampling request holds past its step for the next step's proposals
    # (speculative decoding's num_speculative_tokens; 0 without it)
    num_lookahead_tokens: int = 0
    # batches in flight at once (a pipeline's stages), which share the token budget
    num_batches: int = 1

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_batched_tokens < self.num_batches:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} leaves "
                             f"no tokens for each of {self.num_batches} batches in flight")
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
