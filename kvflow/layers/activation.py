"""Gated activations: [..., 2 * d] (gate and up side by side) -> act(gate) * up, [..., d]."""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.layers.native import NativeKernelHook


class SiluAndMul(nn.Module, NativeKernelHook):
    kernel_ops = ("silu_and_mul",)

    def __init__(self) -> None:
        super().__init__()
        self.native: ModuleType | None = None

    def attach_native(self, ops: ModuleType) -> bool:
        self.native = ops
        return True

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module, NativeKernelHook):
    """GELU with the tanh approximation (Gemma's gelu_pytorch_tanh)."""

    kernel_ops = ()

    def attach_native(self, ops: ModuleType) -> bool:
        return False  # no native kernel: PyTorch's fused GELU is a single pass already

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


class ClampedSwiGLU(nn.Module, NativeKernelHook):
    """gpt-oss's expert activation: gate clamped above and up on both sides at `limit`,
    then (up + 1) * gate * sigmoid(alpha * gate) (transformers' GptOssExperts._apply_gate,
    with gate and up as halves; its checkpoints interleave them, undone at load)."""

    kernel_ops = ()

    def __init__(self, alpha: float = 1.702, limit: float = 7.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.limit = limit

    def attach_native(self, ops: ModuleType) -> bool:
        return False  # no native kernel: it runs only in the experts' PyTorch path so far

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": SiluAndMul, "gelu_tanh": GeluTanhAndMul}
