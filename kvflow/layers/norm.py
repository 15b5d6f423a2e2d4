from __future__ import annotations

from types import ModuleType

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as the HF reference does.

    Given a residual, the input is first added to it, in place: the residual tensor becomes
    the new residual stream and is returned beside the normalised output (one fused pass
    with the native kernels). Callers hand the residual over; they must not keep using it
    as it was."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.native: ModuleType | None = None  # set by kernels.tuning.install_native_kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.native is not None:
            out = self.native.rms_norm(x.contiguous(), self.weight, residual, self.eps)
            return out if residual is None else (out, residual)
        if residual is not None:
            residual.add_(x)
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
