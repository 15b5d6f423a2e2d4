"""Experts on the host CPU, the rest of the model on its device (llama.cpp's `--cpu-moe` and
`--n-cpu-moe N`; KTransformers' split).

An MoE model's experts are most of its weights, and each token reads only its few: work
that suits the host's large memory and the CPU kernels, while attention, the dense
layers, the router and the KV cache stay on the GPU. A placed layer's expert weights are
created in host memory (never on the device first, where they may not fit) and computed
by the CPU; the layer's hidden states cross to the host and back once per step. The copy
to the host is queued before the shared expert's device work (Qwen2-MoE), so the device
computes that while the CPU computes the routed experts.

Which layers are placed is an ambient setting while a model is built (as torch.device is
for where its parameters go), so that family files need not pass it down.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertPlacement:
    """The expert layers among the model's first `num_layers` layers (None: all) keep
    their weights on `device` and compute there."""

    device: torch.device
    num_layers: int | None = None

    def __post_init__(self) -> None:
        if self.num_layers is not None and self.num_layers < 0:
            raise ValueError(f"n_cpu_moe={self.num_layers}: the number of layers whose "
                             "experts run on the CPU cannot be negative")

    def places(self, layer_idx: int) -> bool:
        return self.num_layers is None or layer_idx < self.num_layers


def expert_placement(cpu_moe: bool, n_cpu_moe: int | None, device: torch.device,
                     has_experts: bool) -> ExpertPlacement | None:
    """What --cpu-moe / --n-cpu-moe ask for a model on `device`, and why nothing where they
    cannot apply (logged)."""
    if not cpu_moe and n_cpu_moe is None:
        return None
    flag = "--cpu-moe" if cpu_moe else f"--n-cpu-moe {n_cpu_moe}"
    if not has_experts:
        logger.warning("%s: the model has no expert layers; nothing to place", flag)
        return None
    if device.type == "cpu":
        logger.info("%s: the model runs on the CPU already; nothing to place", flag)
        return None
    logger.info("%s: expert weights in host memory, computed by the CPU", flag)
    return ExpertPlacement(torch.device("cpu"), None if cpu_moe else n_cpu_moe)


_placement: ContextVar[ExpertPlacement | None] = ContextVar("expert_placement", default=None)


@contextlib.contextmanager
def placing_experts(placement: ExpertPlacement | None) -> Iterator[None]:
    """Expert layers built inside this follow `placement` (None: with their model)."""
    token = _placement.set(placement)
    try:
        yield
    finally:
        _placement.reset(token)


def expert_device(layer_idx: int) -> torch.device | None:
    """Where the expert layer of layer `layer_idx` being built goes (None: with the model)."""
    placement = _placement.get()
    return placement.device if placement is not None and placement.places(layer_idx) else None


@dataclass
class Staged:
    """A step's inputs to placed experts, copied (or being copied) to their device."""

    x: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    copied: torch.cuda.Event | None  # None: the copies are done


class HostExperts:
    """Moves an expert layer's inputs to its device and its output back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stage(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> Staged:
        """Start the copies; device work queued after this overlaps them and the experts."""
        if x.device.type != "cuda":
            return Staged(x.to(self.device), weights.to(self.device), ids.to(self.device), None)
        # Pinned buffers, so that the copies are asynchronous; the event marks them done.
        host = [torch.empty(t.shape, dtype=t.dtype, device=self.device, pin_memory=True)
                for t in (x, weights, ids)]
        for target, source in zip(host, (x, weights, ids)):
            target.copy_(source, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return Staged(*host, copied)

    def run(self, experts: torch.nn.Module, staged: Staged, out_device: torch.device
            ) -> torch.Tensor:
        if staged.copied is not None:
            staged.copied.synchronize()
        return experts(staged.x, staged.weights, staged.ids).to(out_device)
