"""Pipeline parallelism as the model sees it: which layers a stage holds, and what passes
from one stage to the next.

A stage's config (`stage_config`) names its layers [first, end); the family files build
those and put a `MissingLayer` where each other layer would be, so that a checkpoint's
names still find their layers and the loader can skip the tensors that belong elsewhere.
The first stage holds the embedding, the last the final norm and the LM head (and the
embedding too where the head is tied to it). Between stages the hidden states and the
residual stream travel as a `Carry` (kvflow/distributed/pipe.py sends it).

Layers are cut so that each stage reads about as many weight bytes per step, the LM head
counted with the last stage: in a small model the head weighs as much as several layers,
and a decode step's time is the time to read the weights.
"""
from __future__ import annotations

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


def _layer_cost(config: ModelConfig) -> int:
    """The weights one decoder layer reads per step, in parameters."""
    hidden, heads = config.hidden_size, config.head_dim
    attention = hidden * heads * (2 * config.num_heads + 2 * config.num_kv_heads)
    moe = config.moe
    if moe is None:
        return attention + 3 * hidden * config.intermediate_size
    return attention + 3 * hidden * (moe.top_k * moe.intermediate_size + moe.shared_expert_size)


def stage_ranges(config: ModelConfig, stages: int) -> list[tuple[int, int]]:
    """Each stage's layers [first, end), contiguous, at least one each, chosen to make the
    costliest stage (its layers, plus the LM head for the last) as cheap as it can be."""
    layers = config.num_layers
    if stages > layers:
        raise ValueError(f"pipeline_parallel_size={stages} exceeds {config.architecture}'s "
                         f"{layers} layers: every stage needs one at least")
    layer, head = _layer_cost(config), config.vocab_size * config.hidden_size
    # best[s][n]: the least cost of the costliest stage when s stages hold the first n layers
    # (the head not counted); cut[s][n]: where the last of them starts.
    inf = float("inf")
    best = [[inf] * (layers + 1) for _ in range(stages + 1)]
    cut = [[0] * (layers + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for n in range(s, layers + 1):
            for start in range(s - 1, n):
                tail = (n - start) * layer + (head if s == stages and n == layers else 0)
                cost = max(best[s - 1][start], tail)
                if cost < best[s][n]:
                    best[s][n], cut[s][n] = cost, start
    ranges, end = [], layers
    for s in range(stages, 0, -1):
        ranges.append((cut[s][end], end))
        end = cut[s][end]
    return ranges[::-1]


def stage_config(config: ModelConfig, stages: int, stage: int) -> ModelConfig:
    """The model as stage `stage` of `stages` holds it."""
    if stages == 1:
        return config
    return replace(config, layer_range=stage_ranges(config, stages)[stage])
