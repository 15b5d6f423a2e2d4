"""A GGUF file opened with the `gguf` package's reader: its metadata, its tensors under
Hugging Face names, and every reason kvflow cannot run it, found before anything is built.

llama.cpp names tensors `blk.N.attn_q.weight` and keeps each architecture's settings under
`{architecture}.*` keys; the layout its family registers (kvflow/models/gguf/layout.py)
maps both onto the names and fields kvflow's model of that family uses.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvflow.models.gguf.header import GgufHeader, TensorInfo, read_header
from kvflow.models.gguf.layout import GLOBAL_TENSORS, GgufLayout
from kvflow.models.registry import ModelFamily, gguf_families

# Tensors that hold RoPE settings, not weights: Llama 3.1's scaling as one divisor per
# frequency, and LongRoPE's (Phi-3's) short and long divisors.
ROPE_TENSORS = ("rope_freqs", "rope_factors_short", "rope_factors_long")
# An order of magnitude past any model's expert count (llama.cpp takes up to 1024), as
# gguf/config.py bounds the other sizes.
MAX_EXPERTS = 1 << 14
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def hf_tensor_name(name: str, layout: GgufLayout) -> str:
    """llama.cpp's tensor name -> the Hugging Face checkpoint's; ValueError if kvflow's
    model of the layout's family has no such tensor."""
    match = _LAYER_TENSOR.fullmatch(name)
    if match and match.group(2) in layout.layer_tensors:
        module = layout.layer_tensors[match.group(2)]
        return f"model.layers.{match.group(1)}.{module}.{match.group(3)}"
    base, _, kind = name.rpartition(".")
    if base in GLOBAL_TENSORS and kind in ("weight", "bias"):
        return f"{GLOBAL_TENSORS[base]}.{kind}"
    raise ValueError(f"GGUF tensor {name!r} has no counterpart in kvflow's "
                     f"{layout.architecture} model")


@dataclass(frozen=True)
class GgufTensor:
    name: str  # llama.cpp's
    hf_name: str
    type_name: str  # GGML type, e.g. "Q4_K"
    shape: tuple[int, ...]  # torch order: [out_features, in_features] for a weight
    data: np.ndarray  # the file's bytes or values, memory-mapped; rows in the file's order


# numpy's type for the GGML types a file stores as plain numbers; the others are blocks,
# read as bytes.
_PLAIN_TYPES = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4",
                "I64": "i8"}


def _tensor_data(data: np.memmap, header: GgufHeader, info: TensorInfo) -> np.ndarray:
    """The tensor's values (plain types) or bytes (block types) as GGUFReader shapes them:
    dims reversed, a block type's last dim in bytes."""
    from gguf.quants import quant_shape_to_byte_shape

    start = header.data_start + info.offset
    raw = data[start:start + info.num_bytes]
    shape = tuple(reversed(info.dims))
    plain = _PLAIN_TYPES.get(info.type.name)
    if plain is not None:
        return raw.view(np.dtype(header.byte_order + plain)).reshape(shape)
    return raw.reshape(quant_shape_to_byte_shape(shape, info.type))


class GgufFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"GGUF file {self.path} does not exist")
        self._header = read_header(self.path)
        self.gguf_architecture = str(self.get("general.architecture"))
        # GGUF's name for an architecture -> the family kvflow runs it as
        # (kvflow/models/registry.py); Mistral 7B files are written as "llama".
        families = gguf_families()
        if self.gguf_architecture not in families:
            raise ValueError(f"{self.path.name}: GGUF architecture "
                             f"{self.gguf_architecture!r:.80} is not supported; supported: "
                             f"{', '.join(sorted(families))}")
        family = self._family(families[self.gguf_architecture])
        self.architecture = family.architecture  # the Hugging Face name
        assert family.gguf is not None
        self.layout: GgufLayout = family.gguf
        # ROPE_TENSORS the file holds, by name, as float32 vectors: config, not weights.
        self.rope_tensors: dict[str, np.ndarray] = {}
        self.tensors = self._read_tensors()

    def _family(self, families: list[ModelFamily]) -> ModelFamily:
        """The family of the file among those registered under its architecture name: where
        there are two (Llama and Mixtral, both "llama"), the one with experts if the file
        counts any."""
        if len(families) == 1:
            return families[0]
        has_experts = self.arch_int("expert_count", 0, MAX_EXPERTS, 0) > 0
        return next(f for f in families if f.gguf is not None
                    and f.gguf.has_experts == has_experts)

    def keys(self) -> list[str]:
        return list(self._header.fields)

    def get(self, key: str, default: Any = ...) -> Any:
        """A metadata value; without a default, a missing key is an error naming it."""
        if key not in self._header.fields:
            if default is ...:
                raise ValueError(f"{self.path.name} lacks the GGUF metadata key {key!r}")
            return default
        return self._header.fields[key]

    def arch(self, key: str, default: Any = ...) -> Any:
        """A `{architecture}.key` value."""
        return self.get(f"{self.gguf_architecture}.{key}", default)

    def arch_int(self, key: str, low: int, high: int, default: int | None = None,
                 reason: str = "") -> int:
        """A `{architecture}.key` integer in [low, high] (a missing key is its default, or
        an error without one); ValueError naming the key for any other value."""
        name = f"{self.gguf_architecture}.{key}"
        value = self.get(name, ... if default is None else default)
        return self.check_int(name, value, low, high, reason)

    def check_int(self, name: str, value: Any, low: int, high: int, reason: str = "") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.path.name}: metadata key {name!r} is {value!r:.80}, "
                             "not an integer")
        if not low <= value <= high:
            raise ValueError(f"{self.path.name}: metadata key {name!r} is {value:,}; kvflow "
                             f"takes {low:,} to {high:,}{reason}")
        return value

    def arch_float(self, key: str, default: Any = ...) -> Any:
        """A positive, finite `{architecture}.key` number; a missing key is `default`
        (None included), or an error without one."""
        name = f"{self.gguf_architecture}.{key}"
        value = self.get(name, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 < value < math.inf):
            raise ValueError(f"{self.path.name}: metadata key {name!r} is {value!r:.80}, not "
                             "a positive finite number")
        return float(value)

    def _read_tensors(self) -> dict[str, GgufTensor]:
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        tensors = {}
        for info in self._header.tensors:
            values = _tensor_data(data, self._header, info)
            base = info.name.removesuffix(".weight")
            if base in ROPE_TENSORS:
                if info.type.name != "F32":
                    raise ValueError(f"{self.path.name}: tensor {info.name!r} is "
                                     f"{info.type.name}; RoPE factors are F32")
                self.rope_tensors[base] = np.array(values, dtype=np.float32).reshape(-1)
                continue
            tensors[info.name] = GgufTensor(info.name, hf_tensor_name(info.name, self.layout),
                                            info.type.name, tuple(reversed(info.dims)), values)
        return tensors
