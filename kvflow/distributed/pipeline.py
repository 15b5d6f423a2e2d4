"""Pipeline parallelism as the model sees it: which layers a stage holds, and what passes
from one stage to the next.

A stage's config (`stage_config`) names its layers [first, end); the family files build
those and put a `MissingLayer` where each other layer would be, so that a checkpoint's
names still find their layers and the loader can skip the tensors that belong elsewhere.
The first stage holds the embedding, the last the final norm and the LM head (and the
embedding too where the head is tied to it). Between stages the hidden states and the
residual stream travel as a `Carry` (kvflow/distributed/pipe.py sends it).

Layers are cut evenly. Where the stages overlap, many requests are in flight and a step
computes many more tokens than it samples, so the LM head (on the last stage, for the
sampled rows only) and the sampling and scheduling on rank 0 (the first stage) cost
little beside the layers: measured on `mixed` with the qwen2.5-0.5b shape, 12 + 12 layers
ran 1.18x as fast as 17 + 7, the cut that evens out the weight bytes a decode step reads
with the 9-layer-heavy head counted in full (docs/benchmarks.md).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from kvflow.models.config import ModelConfig


@dataclass
class Carry:
    """What a stage hands the next: the last layer's output and the residual stream before
    it (the next layer's norm adds them)."""

    hidden: torch.Tensor
    residual: torch.Tensor | None


class MissingLayer(nn.Module):
    """A place held for a module another stage holds."""

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("a module held by another pipeline stage was called")


def elsewhere(model: nn.Module) -> set[str]:
    """The names of the modules another stage holds."""
    return {name for name, module in model.named_modules() if isinstance(module, MissingLayer)}


def stage_ranges(config: ModelConfig, stages: int) -> list[tuple[int, int]]:
    """Each stage's layers [first, end): as many each, the later stages taking one more
    where they do not divide (the first stage's rank 0 also schedules and samples)."""
    layers = config.num_layers
    if stages > layers:
        raise ValueError(f"pipeline_parallel_size={stages} exceeds {config.architecture}'s "
                         f"{layers} layers: every stage needs one at least")
    base, extra = divmod(layers, stages)
    sizes = [base + (stage >= stages - extra) for stage in range(stages)]
    ends = list(itertools.accumulate(sizes))
    return [(end - size, end) for size, end in zip(sizes, ends)]


def stage_config(config: ModelConfig, stages: int, stage: int) -> ModelConfig:
    """The model as stage `stage` of `stages` holds it."""
    if stages == 1:
        return config
    return replace(config, layer_range=stage_ranges(config, stages)[stage])
