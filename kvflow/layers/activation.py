from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate and up side by side) -> silu(gate) * up, [..., d]."""

    def __init__(self) -> None:
        super().__init__()
        self.native: ModuleType | None = None  # set by kernels.tuning.install_native_kernels

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
