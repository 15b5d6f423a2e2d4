"""The int8 and int4 formats for expert layers (kvflow/layers/moe.py), quantized at load
or, from a GGUF file's Q8_0 and Q4 stacks, taken as PrequantizedWeight parts
(kvflow/models/gguf/weights.py).

Each projection of every expert is stored as the format stores a linear layer's weight
(int8.py, int4.py), stacked across experts: int8 [experts, rows, columns] with a scale
per row [experts, rows]; int4 [experts, rows, columns / 2] packed bytes with a scale and
an offset per group of columns [experts, rows, columns / group_size]. So one expert's
rows are a layer's weight in that format, and the native expert kernel reads them with
the dense GEMVs' inner loops. The PyTorch path dequantizes one expert at a time."""
from __future__ import annotations

import torch

from kvflow.layers.moe import (ExpertMethod, FusedMoE, add_expert_biases, add_expert_parameter,
                               quantized_expert_loader)
from kvflow.quantization.base import PrequantizedWeight, add_parameter
from kvflow.quantization.int4 import (PACK_BLOCK, ROW_BLOCK, blocked_scales, dequantize_int4,
                                      layout, quantize_int4)
from kvflow.quantization.int8 import LAYOUT as INT8_LAYOUT
from kvflow.quantization.int8 import dequantize_int8, quantize_int8, weight_block_sums


class Int8ExpertMethod(ExpertMethod):
    """Per output row, symmetric; the kernel reads the weights and scales as they are."""

    def create_weights(self, layer: FusedMoE, bias: bool) -> None:
        dtype = self.scale_dtype = torch.get_default_dtype()
        for name, rows, columns, projections in layer.projections():
            loader = quantized_expert_loader(layer, name, lambda w: quantize_int8(w, dtype),
                                             ("", "_scale"), INT8_LAYOUT)
            add_expert_parameter(layer, name, torch.empty(layer.num_experts, rows, columns,
                                                          dtype=torch.int8),
                                 projections, loader)
            add_parameter(layer, f"{name}_scale", torch.empty(layer.num_experts, rows), loader,
                          filled_by=name)
        add_expert_biases(layer, bias)

    def expert_weight(self, layer: FusedMoE, name: str, expert: int) -> torch.Tensor:
        return dequantize_int8(getattr(layer, name)[expert],
                               getattr(layer, f"{name}_scale")[expert])

    def kernel_scales(self, layer: FusedMoE) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.gate_up_proj_scale, layer.down_proj_scale

    def int8_activation_sums(self, layer: FusedMoE
                             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each expert's rows' weight sums per block of x's columns, as the dense int8
        layers' native_int8_activations kernel reads them (None where the columns do not
        make whole blocks or the rows whole groups of 4)."""
        try:
            return tuple(weight_block_sums(w.reshape(-1, w.shape[-1])).view(*w.shape[:2], -1)
                         for w in (layer.gate_up_proj, layer.down_proj))
        except ValueError:
            return None

    def columns_of(self, weight: torch.Tensor, first: int,
                   width: int) -> PrequantizedWeight:
        # Each row's scale over the whole row, as one rank would hold it.
        q, scale = quantize_int8(weight.reshape(-1, weight.shape[-1]), self.scale_dtype)
        part = q.view(weight.shape).narrow(-1, first, width)
        return PrequantizedWeight(INT8_LAYOUT, (part.reshape(-1, width).contiguous(), scale))


class Int4ExpertMethod(ExpertMethod):
    """Groups of group_size columns, asymmetric. The kernel reads the scales blocked as
    the int4 GEMV does (blocked_scales: a copy 1/16 of the packed weights' size at groups
    of 128), made when the kernel is attached."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(self, layer: FusedMoE, bias: bool) -> None:
        for name, _, columns, _ in layer.projections():
            # Columns in whole groups and packing blocks; then rows (hidden and 2 x inner)
            # come in whole blocks of 16, gate's and up's each.
            if columns % PACK_BLOCK or columns % self.group_size:
                raise ValueError(f"int4 quantization needs every expert projection's input "
                                 f"size to be a multiple of {PACK_BLOCK} and of the group size "
                                 f"({self.group_size}); {layer.prefix}.{name} has {columns}")
        dtype = torch.get_default_dtype()
        for name, rows, columns, projections in layer.projections():
            loader = quantized_expert_loader(
                layer, name, lambda w: quantize_int4(w, self.group_size, dtype),
                ("", "_scale", "_offset"), layout(self.group_size))
            add_expert_parameter(layer, name, torch.empty(layer.num_experts, rows, columns // 2,
                                                          dtype=torch.uint8),
                                 projections, loader)
            for suffix in ("_scale", "_offset"):
                add_parameter(layer, f"{name}{suffix}",
                              torch.empty(layer.num_experts, rows, columns // self.group_size),
                              loader, filled_by=name)
        add_expert_biases(layer, bias)

    def expert_weight(self, layer: FusedMoE, name: str, expert: int) -> torch.Tensor:
        return dequantize_int4(getattr(layer, name)[expert],
                               getattr(layer, f"{name}_scale")[expert],
                               getattr(layer, f"{name}_offset")[expert])

    def kernel_scales(self, layer: FusedMoE) -> tuple[torch.Tensor, torch.Tensor]:
        def blocked(name: str) -> torch.Tensor:
            scale, offset = getattr(layer, f"{name}_scale"), getattr(layer, f"{name}_offset")
            experts, rows, groups = scale.shape
            return blocked_scales(scale.reshape(-1, groups), offset.reshape(-1, groups)).view(
                experts, rows // ROW_BLOCK, groups, 2, ROW_BLOCK)

        return blocked("gate_up_proj"), blocked("down_proj")
