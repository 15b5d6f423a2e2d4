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


class CopyFence:
    """Guards a pinned buffer that is written again and again: a non-blocking copy out of
    it may still be queued behind the GPU's work when the host would write it next."""

    def __init__(self, device: torch.device) -> None:
        self._event = torch.cuda.Event() if device.type == "cuda" else None

    def mark(self) -> None:
        """After queueing the copies out of the buffer."""
        if self._event is not None:
            self._event.record()

    def wait(self) -> None:
        """Before writing the buffer: until the copies marked last have run."""
        if self._event is not None:
            self._event.synchronize()
