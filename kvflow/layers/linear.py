"""Linear layers whose parameters know how to load their own checkpoint tensors.

A merged layer holds several checkpoint projections stacked along the output dim
(q/k/v, gate/up); its `weight_loader` copies one named shard into its rows, so the
fusion happens at load time with no extra copy at run time.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LinearPlan:
    """How one linear layer runs on this machine, chosen by measuring
    (kvflow/kernels/tuning.py): inputs of at most gemv_max_rows rows through the native
    GEMV; larger ones through a second copy of the weight where one measured faster than
    F.linear on the layer's own weight: oneDNN-prepacked, or widened to float32 (for
    bf16 weights on CPUs whose bf16 matmuls are slower than float32 ones)."""

    ops: ModuleType | None = None  # kvflow's native kernels
    gemv_max_rows: int = 0
    packed_weight: torch.Tensor | None = None  # torch.ops.mkldnn._reorder_linear_weight
    float32_weight: torch.Tensor | None = None
    float32_bias: torch.Tensor | None = None


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 plan: LinearPlan | None) -> torch.Tensor:
    if plan is not None and x.dim() == 2:
        if x.shape[0] <= plan.gemv_max_rows:
            return plan.ops.gemv(x, weight, bias)
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


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, "
                         f"expected {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.plan: LinearPlan | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, self.weight, self.bias, self.plan)


class MergedLinear(Linear):
    """Several projections of the same input in one matmul, loaded shard by shard."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        for param in self.parameters():
            param.weight_loader = self._load_shard  # type: ignore[attr-defined]

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        offset, size = self.shard_offsets[shard]
        default_weight_loader(param.data.narrow(0, offset, size), loaded)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split([size for _, size in self.shard_offsets.values()], dim=-1)
