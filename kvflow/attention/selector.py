"""Which attention backend a device gets: by name, or "auto" for the fastest that runs."""
from __future__ import annotations

from types import ModuleType

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.attention.cpu import CpuNativeBackend
from kvflow.attention.torch_ref import TorchRefBackend

BACKEND_NAMES = ("auto", TorchRefBackend.name, CpuNativeBackend.name)


def select_backend(name: str, device: torch.device, native_ops: ModuleType | None,
                   batch_invariant: bool = False) -> AttentionBackend:
    """`auto`: the native CPU kernels where they are in use (kvflow.kernels.tuning decides:
    the CPU, a dtype they support, built here, no enforce_eager); the PyTorch reference
    otherwise, CUDA included until it has a backend of its own."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention_backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == TorchRefBackend.name or (name == "auto" and native_ops is None):
        return TorchRefBackend()
    if native_ops is None:
        raise ValueError("attention_backend='cpu' needs kvflow's native kernels: the CPU, "
                         "float32 or bfloat16, no enforce_eager, and a working build")
    return CpuNativeBackend(native_ops, batch_invariant)
