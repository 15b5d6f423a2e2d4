"""Tensor parallelism as the layers see it: which rank of how many builds this model, and
how a checkpoint tensor is cut for it.

A rank holds a shard of every layer, as Megatron-LM laid out: the fused QKV and gate/up
projections split by output rows (whole heads, KV heads replicated where there are fewer
than ranks), the output and down projections split by input columns and summed across
ranks (one all-reduce each), the embedding and LM head split by vocabulary rows, and each
expert of a mixture split as the dense MLP is (the router whole on every rank). The
layers learn their rank from `current()` while they are built (`building`), so a family
file names each projection's split and knows nothing else of parallelism; a rank's config
(`shard_config`) has its heads and widths, which size its layers and its KV cache.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from kvflow.quantization.base import PrequantizedWeight

if TYPE_CHECKING:
    from kvflow.distributed.comm import Communicator
    from kvflow.models.config import ModelConfig

COLUMN, ROW = "column", "row"  # a projection's output rows split, or its input columns


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    comm: Communicator | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, the same on every rank."""
        return x if self.size == 1 else self.comm.all_reduce(x)

    def gather_columns(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """Every rank's columns side by side, cut to `width` (the padding of the last
        rank's vocabulary shard dropped)."""
        if self.size == 1:
            return x
        return self.comm.all_gather(x)[..., :width]

    def rows_of(self, total: int) -> tuple[int, int]:
        """(first row, rows) of this rank's part of `total` rows split evenly, the last
        part padded: a vocabulary that does not divide by the ranks."""
        per_rank = -(-total // self.size)
        return self.rank * per_rank, per_rank


SINGLE = TensorParallel()
_current = SINGLE


def current() -> TensorParallel:
    """The tensor-parallel rank of the model being built (SINGLE outside `building`)."""
    return _current


@contextlib.contextmanager
def building(tp: TensorParallel) -> Iterator[None]:
    global _current
    previous, _current = _current, tp
    try:
        yield
    finally:
        _current = previous


def shard_config(config: ModelConfig, size: int) -> ModelConfig:
    """The model as each of `size` ranks holds it. Raises ValueError naming what does not
    divide."""
    if size == 1:
        return config
    problems = []
    if config.num_heads % size:
        problems.append(f"num_attention_heads={config.num_heads}")
    kv = config.num_kv_heads
    if kv % size and size % kv:
        problems.append(f"num_key_value_heads={kv} (neither a multiple nor a divisor of it)")
    if config.intermediate_size % size:
        problems.append(f"intermediate_size={config.intermediate_size}")
    moe = config.moe
    if moe is not None and moe.intermediate_size % size:
        problems.append(f"moe_intermediate_size={moe.intermediate_size}")
    if moe is not None and moe.shared_expert_size % size:
        problems.append(f"shared_expert_intermediate_size={moe.shared_expert_size}")
    if problems:
        raise ValueError(f"tensor_parallel_size={size} does not divide {config.architecture}'s "
                         + ", ".join(problems))
    if config.qk_norm_all_heads:
        raise ValueError(f"tensor_parallel_size={size}: {config.architecture}'s q/k norms "
                         "span every head, which kvflow does not split across ranks")
    if moe is not None:  # every expert split as the dense MLP is; the router whole
        moe = replace(moe, intermediate_size=moe.intermediate_size // size,
                      shared_expert_size=moe.shared_expert_size // size)
    return replace(config, num_heads=config.num_heads // size, num_kv_heads=max(1, kv // size),
                   intermediate_size=config.intermediate_size // size,
                   kv_head_replicas=max(1, size // kv), moe=moe)


def _rows(tensor: torch.Tensor | PrequantizedWeight, start: int,
          count: int) -> torch.Tensor | PrequantizedWeight:
    """Rows [start, start + count) of a tensor, or of every part of a quantized weight,
    padded with zero rows past its end (zero blocks decode to zeros in every format)."""
    if isinstance(tensor, PrequantizedWeight):
        return PrequantizedWeight(tensor.layout,
                                  tuple(_rows(p, start, count) for p in tensor.parts))
    part = tensor[start:start + count]
    if part.shape[0] < count:  # the last rank's vocabulary rows, past the end
        part = torch.cat([part, part.new_zeros((count - part.shape[0], *part.shape[1:]))])
    return part


def summed_bias(tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """A bias of a layer whose output is summed over ranks: rank 0 adds it, once."""
    return tensor if tp.rank == 0 else torch.zeros_like(tensor)


def rows_part(tensor: torch.Tensor | PrequantizedWeight, tp: TensorParallel,
              parts: dict[str, tuple[int, int]],
              shard: str | None) -> torch.Tensor | PrequantizedWeight:
    """This rank's output rows of a checkpoint tensor for a layer split by rows (COLUMN).
    parts: the layer's shards as (rows on this rank, ranks holding each), shard: which of
    them the tensor is (None: the whole layer, its shards stacked in order)."""
    if shard is None and len(parts) > 1:
        pieces, start = [], 0
        for name, (rows, replicas) in parts.items():
            whole = rows * tp.size // replicas
            pieces.append(rows_part(_rows(tensor, start, whole), tp,
                                    {name: (rows, replicas)}, name))
            start += whole
        if isinstance(tensor, PrequantizedWeight):
            return PrequantizedWeight(tensor.layout, tuple(
                torch.cat(together) for together in zip(*(p.parts for p in pieces))))
        return torch.cat(pieces)
    rows, replicas = parts[shard] if shard is not None else next(iter(parts.values()))
    return _rows(tensor, (tp.rank // replicas) * rows, rows)
