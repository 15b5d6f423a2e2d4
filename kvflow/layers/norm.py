from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from kvflow.layers.native import NativeKernelHook


class RMSNorm(nn.Module, NativeKernelHook):
    """RMSNorm computed in float32 and cast back before the weight, as the HF reference does.

    Given a residual, the input is first added to it, in place: the residual tensor becomes
    the new residual stream and is returned beside the normalised output (one fused pass
    with the native kernels). Callers hand the residual over; they must not keep using it
    as it was."""

    kernel_ops = ("rms_norm",)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.native: ModuleType | None = None

    def attach_native(self, ops: ModuleType) -> bool:
        self.native = ops
        return True

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


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint stores w and the norm multiplies by (1 + w), in
    float32, before casting back. The parameter holds 1 + w in float32, added once at load
    (the native kernel multiplies in float32 when its weight is float32)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.empty(dim, dtype=torch.float32))
        self.weight.weight_loader = _load_plus_one  # type: ignore[attr-defined]

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight).to(x.dtype)


def _load_plus_one(param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
    if loaded.shape != param.shape:
        raise ValueError(f"shape {list(loaded.shape)}, expected {list(param.shape)}")
    # Summed in float64 and rounded once: for a checkpoint's w the float32 sum transformers
    # computes, and a GGUF file's stored 1 + w comes back bit for bit (its w is given in
    # float64, kvflow/models/gguf/weights.py).
    param.data.copy_(loaded.double() + 1.0)
