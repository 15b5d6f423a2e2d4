"""Which attention backend a device gets: by name, or "auto" for the fastest that runs."""
from __future__ import annotations

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.attention.torch_ref import TorchRefBackend

BACKENDS: dict[str, type[AttentionBackend]] = {
    TorchRefBackend.name: TorchRefBackend,
}
BACKEND_NAMES = ("auto", *BACKENDS)


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "auto":
        name = TorchRefBackend.name
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKEND_NAMES}, got {name!r}")
    return BACKENDS[name]()
