"""A GGUF file's header, key/value section and tensor table, read with every count and
length checked against the bytes that remain.

kvflow reads its GGUF files here, not with the gguf package's GGUFReader, which trusts what
a file claims (an array that claims 2^62 items keeps it building numpy views for ever) and
builds about 1.4 KB of Python objects per item it reads: 2.3 s for a 49,152-token
vocabulary, on every start. transformers still reads a file with GGUFReader when it builds
the file's tokenizer (on a first start; kvflow/tokenizer/loader.py keeps the result), so a
file is also checked to fit that reader in the machine's memory. Every count is checked
against the bytes left before anything is allocated for it.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from kvflow.worker.kv_cache import available_host_memory

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # those the gguf package reads
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
# Generous bounds: real files have tens of keys, at most a few thousand tensors, and arrays
# of at most a vocabulary's size (262,144 tokens, or as many merges).
MAX_KEYS = 65_536
MAX_TENSORS = 65_536
MAX_ARRAY_ITEMS = 1 << 21
MAX_NAME_BYTES = 65_536
# What GGUFReader holds per key, tensor or array item (gguf 0.19, numpy 2: 1.35 KB per
# string item, 0.7 KB per number): the metadata must fit in half the available memory.
READER_BYTES_PER_ITEM = 1536

# struct's code for each scalar type (numpy reads the same codes).
_SCALAR_CODES = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.BOOL: "?",
                 GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I",
                 GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.UINT64: "Q",
                 GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
# The smallest key/value (an empty key and a uint8) and tensor entry (an empty name, one
# dimension), so that a count can be checked against the bytes left before it is walked.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    dims: tuple[int, ...]  # GGUF's order: a row's length first
    offset: int  # from the start of the tensor data
    num_bytes: int


@dataclass(frozen=True)
class GgufHeader:
    fields: dict[str, Any]  # metadata: numbers, bools, strings, and lists of them
    tensors: list[TensorInfo]
    data_start: int  # the tensor data's offset in the file
    byte_order: str  # struct's "<" or ">"


class _Cursor:
    """Reads the file's integers and strings in order, never past its end."""

    def __init__(self, data: mmap.mmap, byte_order: str) -> None:
        self.data = data
        self.byte_order = byte_order
        self._formats = {4: struct.Struct(byte_order + "I"), 8: struct.Struct(byte_order + "Q")}
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def need(self, num_bytes: int, what: str) -> None:
        if num_bytes > self.remaining:
            raise ValueError(f"{what} claims {num_bytes:,} bytes, but only "
                             f"{self.remaining:,} remain in the file")

    def skip(self, num_bytes: int, what: str) -> None:
        self.need(num_bytes, what)
        self.pos += num_bytes

    def unsigned(self, size: int, what: str) -> int:
        self.need(size, what)
        (value,) = self._formats[size].unpack_from(self.data, self.pos)
        self.pos += size
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.unsigned(8, what)
        if limit is not None and length > limit:
            raise ValueError(f"{what} is {length:,} bytes long; kvflow reads at most {limit:,}")
        self.need(length, what)
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not UTF-8") from None


def read_header(path: Path) -> GgufHeader:
    """Raises ValueError, naming the file and what it claims, for a file that is not GGUF,
    whose counts, lengths, tensor shapes or offsets its size cannot hold, or whose
    metadata the gguf reader could not hold in memory."""
    try:
        return _read(path)
    except ValueError as exc:
        raise ValueError(f"{path.name} could not be read as GGUF: {exc}") from None


def check_header(path: Path) -> None:
    """read_header's checks, before the gguf package's reader reads the file."""
    read_header(path)


def _read(path: Path) -> GgufHeader:
    with open(path, "rb") as f:
        if f.seek(0, 2) < 24:
            raise ValueError("the file is too short to be GGUF (truncated?)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != MAGIC:
                raise ValueError("the file does not start with GGUF's magic bytes")
            # A version with empty low bytes is one written on a machine of the other order.
            little = struct.unpack_from("<I", data, 4)[0]
            cursor = _Cursor(data, "<" if little & 0xFFFF else ">")
            cursor.pos = 4
            version = cursor.unsigned(4, "the version")
            if version not in VERSIONS:
                raise ValueError(f"GGUF version {version} is not supported; supported: "
                                 f"{', '.join(map(str, VERSIONS))}")
            num_tensors = _count(cursor, "tensor count", MAX_TENSORS, _MIN_TENSOR_BYTES)
            num_keys = _count(cursor, "key count", MAX_KEYS, _MIN_KV_BYTES)
            fields, num_items, alignment = _read_metadata(cursor, num_keys)
            tensors = [_tensor(cursor, i) for i in range(num_tensors)]
            data_start = -(-cursor.pos // alignment) * alignment
            _check_tensor_data(tensors, len(data) - data_start, alignment)
    _check_memory(num_keys + num_tensors + num_items)
    return GgufHeader(fields, tensors, data_start, cursor.byte_order)


def _count(cursor: _Cursor, what: str, limit: int, min_bytes: int) -> int:
    count = cursor.unsigned(8, f"the {what}")
    if count > limit:
        raise ValueError(f"the {what} is {count:,}; kvflow reads at most {limit:,}")
    cursor.need(count * min_bytes, f"the {what} ({count:,})")
    return count


def _read_metadata(cursor: _Cursor, num_keys: int) -> tuple[dict[str, Any], int, int]:
    """(values, array items, alignment) of the key/value section, read to its end."""
    fields: dict[str, Any] = {}
    num_items = 0
    for index in range(num_keys):
        key = cursor.string(f"key {index}'s name", MAX_NAME_BYTES)
        value_type = _value_type(cursor.unsigned(4, f"{key!r}'s type"), key)
        if key == "general.alignment" and value_type != GGUFValueType.UINT32:
            raise ValueError(f"metadata key {key!r} must be a uint32")
        if value_type == GGUFValueType.ARRAY:
            fields[key] = _array(cursor, key)
            num_items += len(fields[key])
        else:
            fields[key] = _value(cursor, value_type, key)
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1):
        raise ValueError(f"metadata key 'general.alignment' is {alignment}, not a power of two")
    return fields, num_items, alignment


def _value_type(raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ValueError(f"metadata key {key!r} has value type {raw}, which GGUF does "
                         "not define") from None


def _value(cursor: _Cursor, value_type: GGUFValueType, key: str) -> Any:
    what = f"metadata key {key!r}"
    if value_type == GGUFValueType.STRING:
        return cursor.string(what)
    scalar = struct.Struct(cursor.byte_order + _SCALAR_CODES[value_type])
    cursor.need(scalar.size, what)
    (value,) = scalar.unpack_from(cursor.data, cursor.pos)
    cursor.pos += scalar.size
    return value


def _array(cursor: _Cursor, key: str) -> list[Any]:
    what = f"metadata key {key!r}"
    item_type = _value_type(cursor.unsigned(4, what), key)
    count = cursor.unsigned(8, what)
    if item_type == GGUFValueType.ARRAY:
        raise ValueError(f"{what} is an array of arrays, which kvflow does not read")
    if count > MAX_ARRAY_ITEMS:
        raise ValueError(f"{what} is an array of {count:,} items; kvflow reads at most "
                         f"{MAX_ARRAY_ITEMS:,}")
    if item_type == GGUFValueType.STRING:
        cursor.need(count * 8, f"{what} ({count:,} strings)")
        return _strings(cursor, count, what)
    dtype = np.dtype(cursor.byte_order + _SCALAR_CODES[item_type])
    cursor.need(count * dtype.itemsize, f"{what} ({count:,} items)")
    values = np.frombuffer(cursor.data, dtype, count, cursor.pos).tolist()
    cursor.pos += count * dtype.itemsize
    return values


def _strings(cursor: _Cursor, count: int, what: str) -> list[str]:
    """cursor.string `count` times, inlined: a vocabulary's arrays hold 100,000s of them."""
    data, pos, end = cursor.data, cursor.pos, len(cursor.data)
    length_at = cursor._formats[8].unpack_from
    items = []
    try:
        for _ in range(count):
            (length,) = length_at(data, pos)
            pos += 8
            if pos + length > end:
                break
            items.append(data[pos:pos + length].decode("utf-8"))
            pos += length
    except struct.error:  # fewer than 8 bytes left for a length
        pos = end + 1
    except UnicodeDecodeError:
        raise ValueError(f"{what} holds a string that is not UTF-8") from None
    if len(items) < count:
        raise ValueError(f"{what} claims {count:,} strings, but the file ends after "
                         f"{len(items):,}")
    cursor.pos = pos
    return items


def _tensor(cursor: _Cursor, index: int) -> TensorInfo:
    name = cursor.string(f"tensor {index}'s name", MAX_NAME_BYTES)
    what = f"tensor {name!r}"
    num_dims = cursor.unsigned(4, what)
    if not 1 <= num_dims <= MAX_DIMS:
        raise ValueError(f"{what} has {num_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
    dims = tuple(cursor.unsigned(8, what) for _ in range(num_dims))
    type_id = cursor.unsigned(4, what)
    offset = cursor.unsigned(8, what)
    if type_id not in {t.value for t in GGMLQuantizationType}:
        raise ValueError(f"{what} has type id {type_id}, which the gguf package does not know")
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    if min(dims) < 1 or dims[0] % block_size:
        raise ValueError(f"{what} has dimensions {list(dims)}: each must be positive and the "
                         f"first a multiple of its type's block of {block_size}")
    num_elements = 1
    for dim in dims:
        num_elements *= dim
    return TensorInfo(name, GGMLQuantizationType(type_id), dims, offset,
                      num_elements // block_size * type_size)


def _check_tensor_data(tensors: list[TensorInfo], data_bytes: int, alignment: int) -> None:
    if data_bytes < 0:
        raise ValueError("the file ends before its tensor data starts")
    names = set()
    for tensor in tensors:
        what = f"tensor {tensor.name!r}"
        if tensor.name in names:
            raise ValueError(f"{what} appears twice")
        names.add(tensor.name)
        if tensor.offset % alignment:
            raise ValueError(f"{what} starts at data offset {tensor.offset:,}, which is not "
                             f"{alignment}-byte aligned")
        if tensor.offset + tensor.num_bytes > data_bytes:
            raise ValueError(f"{what} claims {tensor.num_bytes:,} bytes at data offset "
                             f"{tensor.offset:,}, past the {data_bytes:,} bytes of tensor "
                             "data the file holds")


def _check_memory(num_items: int) -> None:
    need = num_items * READER_BYTES_PER_ITEM
    available = available_host_memory()
    if need > available // 2:
        raise ValueError(f"its metadata holds {num_items:,} keys, tensors and array items, "
                         f"which would take the gguf reader about {need / 2**30:.1f} GiB; "
                         f"{available / 2**30:.1f} GiB of memory is available")
