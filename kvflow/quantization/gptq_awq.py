"""GPTQ and AWQ checkpoints: 4-bit weights quantized by AutoGPTQ/GPTQModel or AutoAWQ, read
from a Hugging Face checkpoint whose config.json has a `quantization_config`, and loaded
into kvflow's int4 layout (int4.py) as `PrequantizedWeight`s, as GGUF's Q4 tensors are.

Per quantized linear layer of `in` inputs and `out` outputs, with groups = in / group_size
(group_size -1: one group per row, the whole input):
- GPTQ: qweight int32 [in / 8, out], eight 4-bit q packed along the input, low nibble
  first (input 8r + j in bits 4j..4j+3 of row r); qzeros int32 [groups, out / 8], packed
  the same way along the output; scales fp16 [groups, out]; g_idx int32 [in], each
  input's group. The "gptq" (v1) checkpoint format stores zero - 1 in qzeros (AutoGPTQ's
  off-by-one, so a symmetric checkpoint stores 7 for 8); "gptq_v2" stores the zero itself.
- AWQ (AutoAWQ's GEMM version): qweight int32 [in, out / 8], packed along the output with
  the column order [0, 2, 4, 6, 1, 3, 5, 7] (AutoAWQ's AWQ_ORDER: nibble p, bits 4p..4p+3,
  holds column AWQ_ORDER[p] of each eight); qzeros int32 [groups, out / 8], packed the
  same way; scales fp16 [groups, out]. zero_point=false is symmetric: every zero is 8.
Both mean W[o, i] = (q[i, o] - z[g, o]) * s[g, o] with g = i // group_size, which int4
stores as q * scale + offset: scale = s and offset = -z * s. The product is exact in
float32 (an integer of at most 5 bits times a 16-bit float), and scale and offset are then
rounded once to the model's dtype: loaded weights are exact in float32 (and scales in
fp16); in bf16 each group's scale and offset are rounded, as GGUF's Q4 ones are.

Refused, each with an error that names it: bits other than 4, group sizes that are not a
multiple of 32, act-order (desc_act) checkpoints whose g_idx is not i // group_size, other
checkpoint formats (marlin, AWQ's GEMV, ...), a quantized LM head or embedding, and a
fused layer (q/k/v, gate/up) whose shards are not all quantized.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvflow.quantization.base import LinearMethod, PrequantizedWeight, QuantizationConfig
from kvflow.quantization.int4 import (GROUP_MULTIPLE, PACK_BLOCK, ROW_BLOCK, Int4LinearMethod,
                                      pack_int4)
from kvflow.quantization.int4 import layout as int4_layout
from kvflow.quantization.unquantized import UnquantizedLinearMethod

QUANT_METHODS = ("gptq", "awq")
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint format -> what to add to stored zeros
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_SHIFTS = tuple(4 * AWQ_ORDER.index(column) for column in range(8))
_GPTQ_SHIFTS = tuple(4 * j for j in range(8))
_DECODER_PREFIX = "model.layers."


@dataclass(frozen=True)
class CheckpointQuantization:
    """A GPTQ or AWQ checkpoint's quantization_config, checked."""

    method: str  # gptq | awq
    group_size: int  # -1: each layer's whole input
    zero_offset: int  # added to each stored zero (1 for GPTQ v1)
    symmetric_zeros: bool  # AWQ without zero points: every zero is 8, qzeros unread

    @property
    def parts(self) -> tuple[str, ...]:
        """The tensors each quantized layer has in the checkpoint."""
        if self.method == "gptq":
            return ("qweight", "qzeros", "scales", "g_idx")
        return ("qweight", "scales") if self.symmetric_zeros else ("qweight", "qzeros", "scales")

    def in_features(self, qweight_shape: tuple[int, ...]) -> int:
        return qweight_shape[0] * 8 if self.method == "gptq" else qweight_shape[0]

    def out_features(self, qweight_shape: tuple[int, ...]) -> int:
        return qweight_shape[1] if self.method == "gptq" else qweight_shape[1] * 8

    def group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def read_checkpoint_quantization(raw: dict[str, Any] | None) -> CheckpointQuantization | None:
    """config.json's quantization_config (None: a float checkpoint), or a ValueError that
    names what kvflow does not load."""
    if raw is None:
        return None
    method = str(raw.get("quant_method", "")).lower()
    if method not in QUANT_METHODS:
        raise ValueError(
            f"quantization_config.quant_method {raw.get('quant_method')!r} is not supported: "
            "kvflow loads 4-bit 'gptq' and 'awq' checkpoints and GGUF files, and quantizes "
            "a float checkpoint at load with --quantization int8 or int4")
    bits = raw.get("bits", raw.get("w_bit"))
    if bits != 4:
        raise ValueError(f"quantization_config.bits is {bits!r}: kvflow loads 4-bit "
                         f"{method.upper()} checkpoints only")
    group_size = raw.get("group_size", raw.get("q_group_size"))
    if not isinstance(group_size, int) or group_size != -1 and (
            group_size < GROUP_MULTIPLE or group_size % GROUP_MULTIPLE):
        raise ValueError(f"quantization_config.group_size is {group_size!r}: kvflow's int4 "
                         f"needs a multiple of {GROUP_MULTIPLE} (or -1, one group per row)")
    if method == "gptq":
        return _gptq(raw, group_size)
    return _awq(raw, group_size)


def _gptq(raw: dict[str, Any], group_size: int) -> CheckpointQuantization:
    checkpoint_format = raw.get("checkpoint_format", raw.get("format")) or "gptq"
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"quantization_config.checkpoint_format {checkpoint_format!r} is not "
                         f"supported: kvflow loads GPTQ's {' and '.join(GPTQ_FORMATS)} formats")
    if raw.get("dynamic"):
        raise ValueError("quantization_config.dynamic (per-layer GPTQ settings) is not "
                         "supported: kvflow loads one bits and group_size for every layer")
    return CheckpointQuantization("gptq", group_size, GPTQ_FORMATS[checkpoint_format], False)


def _awq(raw: dict[str, Any], group_size: int) -> CheckpointQuantization:
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config.version {raw.get('version')!r} is not "
                         "supported: kvflow loads AWQ's GEMM packing (AutoAWQ's default)")
    backend = str(raw.get("backend", "autoawq")).lower()
    if backend != "autoawq":
        raise ValueError(f"quantization_config.backend {raw.get('backend')!r} is not "
                         "supported: kvflow loads AutoAWQ's packing")
    return CheckpointQuantization("awq", group_size, 0, not raw.get("zero_point", True))


@dataclass(frozen=True)
class CheckpointFormatConfig(QuantizationConfig):
    """--quantization gptq or awq: vLLM's names for these checkpoints, accepted so that
    they carry over. The checkpoint's own quantization_config decides the layers; the
    name is only checked against it (check_quantization_flag)."""

    name: str

    def linear_method(self, prefix: str) -> LinearMethod:
        raise AssertionError("the loader replaces a named format by the checkpoint's plan")


def check_quantization_flag(flag: QuantizationConfig | None,
                            found: CheckpointQuantization | None, source: str) -> None:
    """Refuse --quantization where it does not match what the checkpoint is."""
    if isinstance(flag, CheckpointFormatConfig):
        if found is None:
            raise ValueError(f"quantization={flag.name!r} is for {flag.name.upper()} "
                             f"checkpoints, but {source} has no quantization_config with "
                             f"quant_method {flag.name!r}")
        if found.method != flag.name:
            raise ValueError(f"quantization={flag.name!r}, but {source} is a "
                             f"{found.method.upper()} checkpoint (leave --quantization out: "
                             "the checkpoint's format is read from its config.json)")
    elif flag is not None and found is not None:
        raise ValueError(f"quantization={flag.name!r} quantizes a float checkpoint at load; "
                         f"{source} is a {found.method.upper()} checkpoint, whose weights "
                         "keep their own format")


@dataclass(frozen=True)
class CheckpointQuantConfig(QuantizationConfig):
    """Each linear layer of a GPTQ or AWQ checkpoint: int4 with its group size where the
    checkpoint quantized it, else the model's dtype."""

    name: ClassVar[str] = "gptq/awq"
    groups: dict[str, int] = field(default_factory=dict)  # layer prefix -> group size

    def linear_method(self, prefix: str) -> LinearMethod:
        if prefix in self.groups:
            return Int4LinearMethod(self.groups[prefix])
        return UnquantizedLinearMethod()


def _split(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _layer_prefix(module: str, packed_modules: dict[str, tuple[str, str]]) -> str:
    """The kvflow layer a checkpoint module loads into (q_proj's is qkv_proj)."""
    parent, _, leaf = module.rpartition(".")
    fused = packed_modules.get(leaf)
    return f"{parent}.{fused[0]}" if fused else module


def plan_checkpoint(quant: CheckpointQuantization, shapes: Iterable[tuple[str, tuple[int, ...]]],
                    packed_modules: dict[str, tuple[str, str]]) -> CheckpointQuantConfig:
    """Choose each linear layer's method from the checkpoint's tensor names and shapes:
    int4 where it has a qweight."""
    groups: dict[str, int] = {}
    float_shards: dict[str, str] = {}
    for key, shape in shapes:
        module, leaf = _split(key)
        prefix = _layer_prefix(module, packed_modules)
        if leaf == "weight" and len(shape) == 2:
            float_shards[prefix] = module
        if leaf != "qweight":
            continue
        if not module.startswith(_DECODER_PREFIX):
            raise ValueError(f"{key}: a quantized {module} is not supported: kvflow keeps the "
                             "embedding and the LM head in the model's dtype")
        if len(shape) != 2:
            raise ValueError(f"{key} has shape {shape}, expected 2 dimensions")
        in_features = quant.in_features(shape)
        group = quant.group(in_features)
        if in_features % PACK_BLOCK or in_features % group:
            raise ValueError(f"{module} has {in_features} inputs: kvflow's int4 needs a "
                             f"multiple of {PACK_BLOCK} and of the group size ({group})")
        if quant.out_features(shape) % ROW_BLOCK:
            raise ValueError(f"{module} has {quant.out_features(shape)} outputs: kvflow's "
                             f"int4 needs a multiple of {ROW_BLOCK}")
        groups[prefix] = group
    for prefix, module in float_shards.items():
        if prefix in groups:
            raise ValueError(f"{prefix} fuses quantized and unquantized shards ({module} is "
                             "float): kvflow loads a fused layer in one format")
    return CheckpointQuantConfig(groups)


def _unpack(packed: torch.Tensor, shifts: tuple[int, ...]) -> torch.Tensor:
    """int32 [..., n] -> int32 [..., n, 8]: the nibble at each shift."""
    return (packed[..., None] >> torch.tensor(shifts, dtype=torch.int32)) & 15


def _check(name: str, tensor: torch.Tensor, shape: tuple[int, ...] | None,
           dtype: torch.dtype | None) -> None:
    """shape None: any; dtype None: any float dtype."""
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if dtype is not None and tensor.dtype != dtype:
        raise ValueError(f"{name} is {tensor.dtype}, expected {dtype}")
    if dtype is None and not tensor.is_floating_point():
        raise ValueError(f"{name} is {tensor.dtype}, expected a float dtype")


def unpack_layer(quant: CheckpointQuantization, module: str,
                 tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One layer's checkpoint tensors -> q int32 [in, out], real zeros int32
    [groups, out] and scales [groups, out] as stored, shapes checked."""
    qweight = tensors["qweight"]
    _check(f"{module}.qweight", qweight, None, torch.int32)
    if qweight.dim() != 2:
        raise ValueError(f"{module}.qweight has shape {tuple(qweight.shape)}, expected 2 "
                         "dimensions")
    in_features = quant.in_features(tuple(qweight.shape))
    out = qweight.shape[1] if quant.method == "gptq" else qweight.shape[1] * 8
    group = quant.group(in_features)
    groups = in_features // group
    _check(f"{module}.scales", tensors["scales"], (groups, out), None)
    if quant.method == "gptq":
        q = _unpack(qweight, _GPTQ_SHIFTS).transpose(1, 2).reshape(in_features, out)
        g_idx = tensors["g_idx"]
        _check(f"{module}.g_idx", g_idx, (in_features,), torch.int32)
        if not torch.equal(g_idx, torch.arange(in_features, dtype=torch.int32) // group):
            raise ValueError(f"{module}.g_idx is not i // group_size: act-order (desc_act) "
                             "checkpoints whose inputs are permuted are not supported")
    else:
        q = _unpack(qweight, _AWQ_SHIFTS).reshape(in_features, out)
    if quant.symmetric_zeros:
        zeros = torch.full((groups, out), 8, dtype=torch.int32)
    else:
        qzeros = tensors["qzeros"]
        _check(f"{module}.qzeros", qzeros, (groups, out // 8), torch.int32)
        shifts = _GPTQ_SHIFTS if quant.method == "gptq" else _AWQ_SHIFTS
        zeros = _unpack(qzeros, shifts).reshape(groups, out) + quant.zero_offset
    return q, zeros, tensors["scales"]


def to_int4(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
            dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q [in, out], zeros and scales [groups, out] -> int4's (packed, scale, offset), laid
    out by output row; the one rounding is of scale and offset to `dtype`."""
    scale = scales.float().t()
    offset = -(zeros.float().t() * scale)
    packed = pack_int4(q.t().to(torch.uint8).contiguous())
    return packed, scale.to(dtype).contiguous(), offset.to(dtype).contiguous()


def prequantized_tensors(quant: CheckpointQuantization,
                         tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                         source: str) -> Iterator[tuple[str, torch.Tensor | PrequantizedWeight]]:
    """The checkpoint's tensors, each quantized layer's parts gathered into one
    `{module}.weight` PrequantizedWeight in int4's layout, float ones as they are."""
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors:
        module, leaf = _split(key)
        if leaf == "qzeros" and quant.symmetric_zeros:
            continue  # AWQ without zero points: the zeros are 8, whatever is stored
        if leaf not in quant.parts:
            yield key, tensor
            continue
        parts = pending[module]
        parts[leaf] = tensor
        if len(parts) == len(quant.parts):
            del pending[module]
            try:
                int4 = to_int4(*unpack_layer(quant, module, parts), dtype)
            except ValueError as exc:
                raise ValueError(f"{quant.method.upper()} checkpoint {source}: {exc}") from exc
            in_features = int4[0].shape[1] * 2
            yield f"{module}.weight", PrequantizedWeight(int4_layout(quant.group(in_features)),
                                                         int4)
    for module, parts in sorted(pending.items()):
        missing = [f"{module}.{leaf}" for leaf in quant.parts if leaf not in parts]
        raise ValueError(f"{quant.method.upper()} checkpoint {source} lacks {missing[0]} "
                         f"(each quantized layer has {', '.join(quant.parts)})")
