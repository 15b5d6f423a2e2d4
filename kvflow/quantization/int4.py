"""int4 weight-only quantization at load: group-wise, asymmetric.

Each run of `group_size` input columns of an output row has its own scale and offset:
W[n, k] ~= q[n, k] * scale[n, g] + offset[n, g], q in [0, 15], g = k // group_size (the
offset is the group's minimum, so q spans the group from its minimum to its maximum).
Two q per byte, [out, in / 2] in all, in blocks of 16 output rows (ROW_BLOCK) that each
hold their rows' bytes interleaved: chunk c of a block (32 bytes) covers columns 4c to
4c + 3 of its 16 rows, and its byte 2r + j holds row r's column 4c + j in the low nibble
and column 4c + 2 + j in the high one. Unpacked, a chunk's low and high nibbles are two
vectors of 16 rows x 2 columns, each row a lane: the native GEMV multiplies them by
pairs of x and scales each group of columns for 16 rows with one vector multiply (the
native_int8_activations kernel quantizes x to int8 per group and multiplies integers).
Scale and offset are [out, in / group_size], in the model's dtype."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from kvflow.quantization.base import (DEQUANTIZE, INT8_ACTIVATION_DTYPES, PrequantizedWeight,
                                      QuantizationConfig, QuantizedKernel,
                                      QuantizedLinearMethod, add_bias, add_parameter,
                                      dequantize_buffer, prequantized_columns,
                                      quantized_rows_loader)

if TYPE_CHECKING:
    from kvflow.layers.linear import Linear
    from kvflow.layers.moe import ExpertMethod

PACK_BLOCK = 64  # input columns must be a multiple of this
ROW_BLOCK = 16  # output rows interleaved in a block; every layer and shard a multiple
GROUP_MULTIPLE = 32  # the native kernels apply scales per run of 32 columns


def layout(group_size: int) -> str:
    """The name a PrequantizedWeight in this layout carries."""
    return f"int4-g{group_size}"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [out, in] with values in [0, 15] -> [out, in / 2], the layout above."""
    rows, cols = q.shape
    if rows % ROW_BLOCK or cols % PACK_BLOCK:
        raise ValueError(f"int4 needs a multiple of {ROW_BLOCK} output rows and of "
                         f"{PACK_BLOCK} input columns, not {rows} x {cols}")
    # [block, row, chunk, low or high nibble, column within the pair]
    chunks = q.view(rows // ROW_BLOCK, ROW_BLOCK, cols // 4, 2, 2)
    packed = chunks[:, :, :, 0] | (chunks[:, :, :, 1] << 4)
    return packed.permute(0, 2, 1, 3).contiguous().view(rows, cols // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    rows, half = packed.shape
    chunks = packed.view(rows // ROW_BLOCK, half // 2, ROW_BLOCK, 2).permute(0, 2, 1, 3)
    return torch.stack([chunks & 15, chunks >> 4], dim=3).reshape(rows, half * 2)


def quantize_int4(weight: torch.Tensor, group_size: int,
                  scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (packed uint8 [out, in / 2], scale, offset [out, in / group_size] in scale_dtype).
    q is rounded against scale and offset as stored."""
    rows, cols = weight.shape
    groups = weight.float().view(rows, cols // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale, offset = ((high - low) / 15).to(scale_dtype), low.to(scale_dtype)
    stored = scale.float()
    divisor = torch.where(stored > 0, stored, torch.ones_like(stored))  # constant groups
    q = torch.round((groups - offset.float()[..., None]) / divisor[..., None]).clamp(0, 15)
    return pack_int4(q.to(torch.uint8).view(rows, cols)), scale, offset


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    rows, groups = scale.shape
    q = unpack_int4(packed).float().view(rows, groups, -1)
    return (q * scale.float()[..., None] + offset.float()[..., None]).view(rows, -1)


def blocked_scales(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The scales and offsets as the native GEMV reads them for a block of 16 rows: each
    group's 16 scales, then its 16 offsets, [out / 16, groups, 2, 16] (a copy, 1/16 of the
    packed weight's size at group size 128), so that it need not gather them every call."""
    rows, groups = scale.shape
    parts = [p.view(rows // ROW_BLOCK, ROW_BLOCK, groups) for p in (scale, offset)]
    return torch.stack(parts, dim=2).permute(0, 3, 2, 1).contiguous()


def _native_layout(layer: Linear) -> tuple[torch.Tensor]:
    return (blocked_scales(layer.weight_scale, layer.weight_offset),)


def _native_kernel(layer: Linear, x: torch.Tensor, ops: ModuleType | None) -> torch.Tensor:
    blocked = layer.plan.weights[0] if layer.plan.weights else None
    return ops.int4_gemv(x, layer.weight, layer.weight_scale, layer.weight_offset, layer.bias,
                         blocked)


def _native_int8_activations_kernel(layer: Linear, x: torch.Tensor,
                                    ops: ModuleType | None) -> torch.Tensor:
    return ops.int4_gemv_q8(x, layer.weight, layer.plan.weights[0], layer.bias)


def _native_dequantize_kernel(layer: Linear, x: torch.Tensor,
                              ops: ModuleType | None) -> torch.Tensor:
    out = dequantize_buffer((layer.out_features, layer.in_features), x.dtype)
    weight = ops.int4_dequantize(layer.weight, layer.weight_scale, layer.weight_offset, out)
    return F.linear(x, weight, layer.bias)


TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


def tinygemm_layout(layer: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight as torch._weight_int4pack_mm (CUDA, "tinygemm") reads it: q packed by
    torch._convert_weight_to_int4pack from two columns per byte (even column in the high
    nibble), and [groups, out, 2] bf16 (scale, zero) pairs, where tinygemm computes
    (q - 8) * scale + zero, so zero = offset + 8 * scale."""
    rows, cols = layer.out_features, layer.in_features
    group_size = cols // layer.weight_scale.shape[1]
    if group_size not in TINYGEMM_GROUP_SIZES or rows % 8:
        raise ValueError(f"tinygemm needs a group size in {TINYGEMM_GROUP_SIZES} and a "
                         f"multiple of 8 output rows, not {group_size} and {rows}")
    q = unpack_int4(layer.weight)
    inner_k_tiles = next(t for t in (8, 4, 2) if cols % (16 * t) == 0)
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(),
                                               inner_k_tiles)
    scale = layer.weight_scale.float()
    zero = layer.weight_offset.float() + 8 * scale
    scales_zeros = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()
    return packed, scales_zeros.to(torch.bfloat16)


def _tinygemm_kernel(layer: Linear, x: torch.Tensor, ops: ModuleType | None) -> torch.Tensor:
    packed, scales_zeros = layer.plan.weights
    group_size = layer.in_features // scales_zeros.shape[0]
    y = torch._weight_int4pack_mm(x.contiguous(), packed, group_size, scales_zeros)
    return y if layer.bias is None else y + layer.bias


def _triton_kernel(layer: Linear, x: torch.Tensor, ops: ModuleType | None) -> torch.Tensor:
    from kvflow.kernels.triton_ops import quantized  # CUDA only: triton is imported late

    return quantized.int4_linear(x, layer.weight, layer.weight_scale, layer.weight_offset,
                                 layer.bias)


class Int4LinearMethod(QuantizedLinearMethod):
    # On the CPU, torch._weight_int4pack_mm_for_cpu is no candidate: it reads its own
    # layout (a second copy of the weight), and it measured slower than the native kernel
    # at one row and faster at 4 and 8 (docs/benchmarks.md). On CUDA, tinygemm's copy is
    # what small batches run on, or Triton's kernel on kvflow's own layout, whichever
    # measures faster.
    kernels = {"native": QuantizedKernel(_native_kernel, devices=("cpu",), native=True,
                                         gemv=True, prepare=_native_layout),
               "native_int8_activations": QuantizedKernel(
                   _native_int8_activations_kernel, devices=("cpu",),
                   dtypes=INT8_ACTIVATION_DTYPES, native=True, gemv=True,
                   prepare=_native_layout),
               "native_dequantize": QuantizedKernel(_native_dequantize_kernel,
                                                    devices=("cpu",), native=True),
               "tinygemm": QuantizedKernel(_tinygemm_kernel, devices=("cuda",),
                                           dtypes=(torch.bfloat16,), prepare=tinygemm_layout),
               "triton": QuantizedKernel(_triton_kernel, devices=("cuda",), gemv=True),
               "dequantize": DEQUANTIZE}

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def columns_of(self, weight: torch.Tensor | PrequantizedWeight, first: int, width: int,
                   whole: int) -> torch.Tensor | PrequantizedWeight:
        if not isinstance(weight, PrequantizedWeight):
            return super().columns_of(weight, first, width, whole)
        # The packed values are blocked by 16 rows, not row-major: cut them unpacked.
        packed, *scales = weight.parts
        values = unpack_int4(packed).narrow(1, first, width)
        rest = prequantized_columns(PrequantizedWeight(weight.layout, tuple(scales)), first,
                                    width, whole)
        return PrequantizedWeight(weight.layout, (pack_int4(values.contiguous()), *rest.parts))

    def create_weights(self, layer: Linear, bias: bool) -> None:
        cols = layer.in_features
        if cols % PACK_BLOCK or cols % self.group_size:
            raise ValueError(f"int4 quantization needs every quantized layer's in_features to "
                             f"be a multiple of {PACK_BLOCK} and of the group size "
                             f"({self.group_size}); a layer has {cols}")
        shards = {f"part {shard!r}": size for shard, (_, size) in layer.shard_offsets.items()} \
            or {"the layer": layer.out_features}
        for shard, size in shards.items():
            if size % ROW_BLOCK:
                raise ValueError(f"int4 quantization needs every quantized layer's output "
                                 f"rows, and each merged part's, to be a multiple of "
                                 f"{ROW_BLOCK}; {shard} has {size}")
        dtype = torch.get_default_dtype()
        loader = quantized_rows_loader(
            layer, lambda w: quantize_int4(w, self.group_size, dtype),
            ("weight", "weight_scale", "weight_offset"), layout(self.group_size))
        groups = cols // self.group_size
        add_parameter(layer, "weight", torch.empty(layer.out_features, cols // 2,
                                                   dtype=torch.uint8), loader)
        for name in ("weight_scale", "weight_offset"):
            add_parameter(layer, name, torch.empty(layer.out_features, groups), loader,
                          filled_by="weight")
        add_bias(layer, bias)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return dequantize_int4(layer.weight, layer.weight_scale, layer.weight_offset)


@dataclass(frozen=True)
class Int4Config(QuantizationConfig):
    name: ClassVar[str] = "int4"
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.group_size < GROUP_MULTIPLE or self.group_size % GROUP_MULTIPLE:
            raise ValueError(f"quantization_group_size must be a positive multiple of "
                             f"{GROUP_MULTIPLE}, got {self.group_size}")

    def linear_method(self, prefix: str = "") -> Int4LinearMethod:
        return Int4LinearMethod(self.group_size)

    def expert_method(self, prefix: str) -> ExpertMethod:
        # Imported here: the expert layer imports this package.
        from kvflow.quantization.experts import Int4ExpertMethod

        return Int4ExpertMethod(self.group_size)
