"""The unquantized method: a weight in the model's dtype, run by whichever path measured
fastest on this machine (kvflow/kernels/tuning.py sets the layer's `LinearPlan`)."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvflow.kernels.variants import DEFAULT, GemvVariant
from kvflow.quantization.base import LinearMethod, add_bias, add_parameter, row_loader

if TYPE_CHECKING:
    from kvflow.layers.linear import Linear


@dataclass(frozen=True)
class LinearPlan:
    """How one linear layer runs on this machine, chosen by measuring
    (kvflow/kernels/tuning.py): inputs of at most gemv_max_rows rows through the native
    GEMV, reading the weight as gemv_variant says; larger ones through a second copy of the weight where one measured faster than
    F.linear on the layer's own weight: oneDNN-prepacked, or widened to float32 (for
    bf16 weights on CPUs whose bf16 matmuls are slower than float32 ones)."""

    ops: ModuleType | None = None  # kvflow's native kernels
    gemv_max_rows: int = 0
    gemv_variant: GemvVariant = DEFAULT
    packed_weight: torch.Tensor | None = None  # torch.ops.mkldnn._reorder_linear_weight
    float32_weight: torch.Tensor | None = None
    float32_bias: torch.Tensor | None = None


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: Linear, bias: bool) -> None:
        loader = row_loader(layer)
        add_parameter(layer, "weight", torch.empty(layer.out_features, layer.in_features),
                      loader)
        add_bias(layer, bias)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, layer.weight, layer.bias, layer.plan)


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 plan: LinearPlan | None) -> torch.Tensor:
    if plan is not None and x.dim() == 2:
        if x.shape[0] <= plan.gemv_max_rows:
            variant = plan.gemv_variant
            return plan.ops.gemv(x, weight, bias, variant.streams, variant.prefetch)
        if plan.packed_weight is not None:
            return _packed_linear(x, plan.packed_weight, bias)
        if plan.float32_weight is not None:
            return F.linear(x.float(), plan.float32_weight, plan.float32_bias).to(x.dtype)
    return F.linear(x, weight, bias)


def packed_rows(rows: int) -> int:
    """The row count a oneDNN-prepacked product runs at: rows rounded up to one of four
    sizes per power of two (multiples of 16 at least). oneDNN and ideep cache a primitive
    per input shape (1,024 each), about 0.2 MiB apiece; under continuous batching the row
    count changes every step, and with exact shapes the caches grew the server's memory
    by hundreds of MiB. Rounded, a layer meets 24 shapes up to 2,048 rows, for 9% more
    rows on average (at most 25% above 64 rows, at most 15 rows below)."""
    step = max(16, 1 << max(0, rows.bit_length() - 3))
    return -(-rows // step) * step


def _packed_linear(x: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    padded = packed_rows(rows)
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")[:rows]
