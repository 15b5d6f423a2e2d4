"""int8 weight-only quantization at load: per output channel, symmetric.

W[n, :] ~= q[n, :] * scale[n], q in [-127, 127] (int8, [out, in], the layout
torch._weight_int8pack_mm reads), scale in the model's dtype. Activations stay in the
model's dtype, except in the native_int8_activations kernel, which quantizes them to int8
per block of columns for the CPU's integer dot products (see kvflow/kernels/csrc)."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from kvflow.quantization.base import (DEQUANTIZE, INT8_ACTIVATION_DTYPES,
                                      PrequantizedWeight, QuantizationConfig, QuantizedKernel,
                                      QuantizedLinearMethod, add_bias, add_parameter,
                                      dequantize_buffer, quantized_rows_loader)

if TYPE_CHECKING:
    from kvflow.layers.linear import Linear
    from kvflow.layers.moe import ExpertMethod


LAYOUT = "int8"  # the name a PrequantizedWeight in this layout carries


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q int8 [out, in], scale [out] in scale_dtype). q is rounded against the scale
    as stored, so q * scale is the weight the layer computes with."""
    weight = weight.float()
    scale = (weight.abs().amax(dim=1) / 127).to(scale_dtype)
    stored = scale.float()
    # An all-zero row (or one whose scale underflows the dtype) quantizes to zeros.
    divisor = torch.where(stored > 0, stored, torch.ones_like(stored))
    q = torch.round(weight / divisor[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def _torch_kernel(layer: Linear, x: torch.Tensor, ops: ModuleType | None) -> torch.Tensor:
    y = torch._weight_int8pack_mm(x, layer.weight, layer.weight_scale)
    return y if layer.bias is None else y + layer.bias


def _triton_kernel(layer: Linear, x: torch.Tensor, ops: ModuleType | None) -> torch.Tensor:
    from kvflow.kernels.triton_ops import quantized  # CUDA only: triton is imported late

    return quantized.int8_linear(x, layer.weight, layer.weight_scale, layer.bias)


def _native_kernel(layer: Linear, x: torch.Tensor, ops: ModuleType | None) -> torch.Tensor:
    variant = layer.plan.variant
    return ops.int8_gemv(x, layer.weight, layer.weight_scale, layer.bias, variant.streams,
                         variant.prefetch)


def activation_block(cols: int) -> int:
    """Columns per int8 scale of x in the native_int8_activations kernel."""
    if cols % 64:
        raise ValueError(f"int8 activations need a multiple of 64 input columns, not {cols}")
    return 128 if cols % 128 == 0 else 64


def weight_block_sums(q: torch.Tensor) -> torch.Tensor:
    """Each row's weight sum per block of x's columns, int32 [out, in / block]: the
    native_int8_activations kernel feeds x to vpdpbusd as q + 128 and takes 128 * these
    back off."""
    rows, cols = q.shape
    if rows % 4:
        raise ValueError(f"int8 activations need a multiple of 4 output rows, not {rows}")
    block = activation_block(cols)
    return q.view(rows, cols // block, block).sum(dim=2, dtype=torch.int32)


def block_sums(layer: Linear) -> tuple[torch.Tensor]:
    """The layer's copy for the native_int8_activations kernel: its weight_block_sums."""
    return (weight_block_sums(layer.weight),)


def _native_int8_activations_kernel(layer: Linear, x: torch.Tensor,
                                    ops: ModuleType | None) -> torch.Tensor:
    variant = layer.plan.variant
    return ops.int8_gemv_q8(x, layer.weight, layer.weight_scale, layer.plan.weights[0],
                            layer.bias, variant.streams, variant.prefetch)


def _native_dequantize_kernel(layer: Linear, x: torch.Tensor,
                              ops: ModuleType | None) -> torch.Tensor:
    out = dequantize_buffer((layer.out_features, layer.in_features), x.dtype)
    return F.linear(x, ops.int8_dequantize(layer.weight, layer.weight_scale, out), layer.bias)


class Int8LinearMethod(QuantizedLinearMethod):
    kernels = {"native": QuantizedKernel(_native_kernel, devices=("cpu",), native=True,
                                         gemv=True, variants=True),
               "native_int8_activations": QuantizedKernel(
                   _native_int8_activations_kernel, devices=("cpu",),
                   dtypes=INT8_ACTIVATION_DTYPES, native=True, gemv=True, variants=True,
                   prepare=block_sums),
               "native_dequantize": QuantizedKernel(_native_dequantize_kernel,
                                                    devices=("cpu",), native=True),
               "torch": QuantizedKernel(_torch_kernel),
               "triton": QuantizedKernel(_triton_kernel, devices=("cuda",), gemv=True),
               "dequantize": DEQUANTIZE}

    def create_weights(self, layer: Linear, bias: bool) -> None:
        dtype = self.scale_dtype = torch.get_default_dtype()
        loader = quantized_rows_loader(layer, lambda w: quantize_int8(w, dtype),
                                       ("weight", "weight_scale"), LAYOUT)
        add_parameter(layer, "weight", torch.empty(layer.out_features, layer.in_features,
                                                   dtype=torch.int8), loader)
        add_parameter(layer, "weight_scale", torch.empty(layer.out_features), loader,
                      filled_by="weight")
        add_bias(layer, bias)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return dequantize_int8(layer.weight, layer.weight_scale)

    def columns_of(self, weight: torch.Tensor | PrequantizedWeight, first: int, width: int,
                   whole: int) -> PrequantizedWeight:
        if isinstance(weight, PrequantizedWeight):  # its scales already span whole rows
            return super().columns_of(weight, first, width, whole)
        q, scale = quantize_int8(weight, self.scale_dtype)  # each row's scale over all of it
        return PrequantizedWeight(LAYOUT, (q.narrow(1, first, width).contiguous(), scale))


@dataclass(frozen=True)
class Int8Config(QuantizationConfig):
    name: ClassVar[str] = "int8"

    def linear_method(self, prefix: str = "") -> Int8LinearMethod:
        return Int8LinearMethod()

    def expert_method(self, prefix: str) -> ExpertMethod:
        # Imported here: the expert layer imports this package.
        from kvflow.quantization.experts import Int8ExpertMethod

        return Int8ExpertMethod()
