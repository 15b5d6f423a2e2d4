"""Which attention backend a device gets: by name, or "auto" for the fastest that runs."""
from __future__ import annotations

from types import ModuleType

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.attention.cpu import CpuNativeBackend
from kvflow.attention.torch_ref import TorchRefBackend
from kvflow.kernels.triton_ops import unavailable_reason

TRITON = "triton"
BACKEND_NAMES = ("auto", TorchRefBackend.name, CpuNativeBackend.name, TRITON)


def select_backend(name: str, device: torch.device, native_ops: ModuleType | None,
                   batch_invariant: bool = False,
                   dtype: torch.dtype | None = None) -> AttentionBackend:
    """`auto`: on the CPU, the native kernels where they are in use (kvflow.kernels.tuning
    decides: a dtype they support, built here, no enforce_eager), else the PyTorch
    reference; on CUDA, Triton's kernels where triton is installed, else the reference.
    `triton` on the CPU runs Triton's interpreter (TRITON_INTERPRET=1): tests only."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention_backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            name = TorchRefBackend.name if unavailable_reason(device, dtype) else TRITON
        else:
            name = CpuNativeBackend.name if native_ops is not None else TorchRefBackend.name
    if name == TorchRefBackend.name:
        return TorchRefBackend()
    if name == TRITON:
        reason = unavailable_reason(device, dtype)
        if reason is not None:
            raise ValueError(f"attention_backend='triton' cannot run here: {reason}")
        from kvflow.attention.triton_backend import TritonBackend

        return TritonBackend(device, batch_invariant)
    if native_ops is None:
        raise ValueError("attention_backend='cpu' needs kvflow's native kernels: the CPU, "
                         "float32 or bfloat16, no enforce_eager, and a working build")
    return CpuNativeBackend(native_ops, batch_invariant)
