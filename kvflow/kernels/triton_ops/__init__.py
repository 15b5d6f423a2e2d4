"""kvflow's Triton kernels: the CUDA path's attention, glue and experts.

They compile for the GPU, and run on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1`, read when a kernel module is first imported), which is how CI, with
no GPU, checks them against the PyTorch reference. The interpreter runs float32 and
float16; it mishandles bfloat16, so kvflow refuses that pairing by name.
"""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why Triton's kernels cannot run on this device in this dtype (None: they can)."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    if device.type == "cpu":
        if not interpreting():
            return ("Triton compiles for GPUs; on the CPU its kernels run only under its "
                    "interpreter (TRITON_INTERPRET=1), which is for tests, not speed")
        if dtype == torch.bfloat16:
            return "Triton's interpreter does not run bfloat16: use float32 or float16"
        return None
    if device.type != "cuda":
        return f"kvflow's Triton kernels run on CUDA devices, not {device.type}"
    return None


def glue_ops(device: torch.device, dtype: torch.dtype, enforce_eager: bool) -> ModuleType | None:
    """CUDA's glue kernels (RMSNorm, SiLU-and-mul, RoPE, the experts) where they run: a
    CUDA device, triton installed, no enforce_eager. The CPU has its native kernels
    instead."""
    if enforce_eager or device.type != "cuda" or unavailable_reason(device, dtype):
        return None
    from kvflow.kernels.triton_ops import cuda_ops

    return cuda_ops
