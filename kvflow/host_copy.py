"""Host values onto the step's device without the host waiting for the device.

A copy from ordinary (pageable) host memory to a GPU waits until the GPU has finished the
work queued before it: a step that builds its inputs while the previous step runs (async
scheduling) would wait for that step at its first copy. From pinned memory the copy is
queued behind that work instead, and the host goes on. PyTorch's caching host allocator
keeps a pinned buffer alive until its copy is done, so the source may be a temporary.
"""
from __future__ import annotations

import torch


def to_device(values: torch.Tensor, device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on `device` (in `dtype`, converted on the host)."""
    if dtype is not None:
        values = values.to(dtype)
    if device.type != "cuda":
        return values if device.type == "cpu" else values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def tensor_on(data: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """torch.tensor(data, dtype) on `device`, queued as to_device queues it."""
    return to_device(torch.tensor(data, dtype=dtype), device)
