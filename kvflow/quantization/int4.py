"""int4 weight-only quantization at load: group-wise, asymmetric.

Each run of `group_size` input columns of an output row has its own scale and offset:
W[n, k] ~= q[n, k] * scale[n, g] + offset[n, g], q in [0, 15], g = k // group_size (the
offset is the group's minimum, so q spans the group from its minimum to its maximum).
Two q per byte, [out, in / 2]: in each block of 64 columns, byte j holds column j in its
low nibble and column 32 + j in its high one, so that unpacking a block's bytes gives
two runs of 32 consecutive columns, the order the native kernel multiplies them in.
Scale and offset are [out, in / group_size], in the model's dtype."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from kvflow.quantization.base import (DEQUANTIZE, QuantizationConfig, QuantizedKernel,
                                      QuantizedLinearMethod, add_bias, add_parameter,
                                      dequantize_buffer, quantized_rows_loader)

if TYPE_CHECKING:
    from kvflow.layers.linear import Linear

PACK_BLOCK = 64  # input columns per packed block
GROUP_MULTIPLE = 32  # the native kernel applies scales per run of 32 columns


def layout(group_size: int) -> str:
    """The name a PrequantizedWeight in this layout carries."""
    return f"int4-g{group_size}"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [out, in] with values in [0, 15] -> [out, in / 2], the layout above."""
    rows, cols = q.shape
    halves = q.view(rows, cols // PACK_BLOCK, 2, PACK_BLOCK // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).view(rows, cols // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    rows, half = packed.shape
    blocks = packed.view(rows, half // (PACK_BLOCK // 2), 1, PACK_BLOCK // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).view(rows, half * 2)


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


def _native_kernel(layer: Linear, x: torch.Tensor, ops: ModuleType | None) -> torch.Tensor:
    return ops.int4_gemv(x, layer.weight, layer.weight_scale, layer.weight_offset, layer.bias)


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


class Int4LinearMethod(QuantizedLinearMethod):
    # On the CPU, torch._weight_int4pack_mm_for_cpu is no candidate: it reads its own
    # layout (a second copy of the weight), and it measured slower than the native kernel
    # at one row and faster at 4 and 8 (docs/benchmarks.md). On CUDA, tinygemm's copy is
    # what small batches run on.
    kernels = {"native": QuantizedKernel(_native_kernel, devices=("cpu",), native=True,
                                         gemv=True),
               "native_dequantize": QuantizedKernel(_native_dequantize_kernel,
                                                    devices=("cpu",), native=True),
               "tinygemm": QuantizedKernel(_tinygemm_kernel, devices=("cuda",),
                                           dtypes=(torch.bfloat16,), prepare=tinygemm_layout),
               "dequantize": DEQUANTIZE}

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(self, layer: Linear, bias: bool) -> None:
        cols = layer.in_features
        if cols % PACK_BLOCK or cols % self.group_size:
            raise ValueError(f"int4 quantization needs every quantized layer's in_features to "
                             f"be a multiple of {PACK_BLOCK} and of the group size "
                             f"({self.group_size}); a layer has {cols}")
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
