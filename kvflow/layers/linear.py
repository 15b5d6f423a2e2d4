"""Linear layers whose parameters and product come from a quantization method
(kvflow/quantization/), and whose parameters load their own checkpoint tensors.

A merged layer holds several checkpoint projections stacked along the output dim
(q/k/v, gate/up); its parameters' loaders write one named shard into its rows, so the
fusion happens at load time with no extra copy at run time.

Under tensor parallelism (kvflow/distributed/tensor_parallel.py) a layer is built with
its rank's sizes and a `split`: it takes its rank's part of each checkpoint tensor
(`rank_part`), and a layer split by input columns sums its output over the ranks.
"""
from __future__ import annotations

import torch
from torch import nn

from kvflow.distributed.tensor_parallel import ROW, SINGLE, current, rows_part, summed_bias
from kvflow.quantization.base import QuantizationConfig
from kvflow.quantization.unquantized import UnquantizedLinearMethod


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool,
                 quant_config: QuantizationConfig | None = None,
                 shard_sizes: dict[str, int] | None = None, prefix: str = "",
                 split: str | None = None, replicas: dict[str, int] | None = None) -> None:
        """prefix: the layer's name in the model (e.g. "model.layers.0.mlp.down_proj"), which
        a quantization config may choose the layer's method by. split: how tensor
        parallelism splits it (COLUMN or ROW; None: every rank holds it whole); replicas:
        the ranks that hold each shard's rows (KV heads fewer than the ranks)."""
        super().__init__()
        self.tp_split = split
        self.tp = current() if split is not None else SINGLE
        self.replicas = replicas or {}
        self.in_features = in_features
        self.out_features = out_features
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in (shard_sizes or {}).items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.method = (UnquantizedLinearMethod() if quant_config is None
                       else quant_config.linear_method(prefix))
        self.method.create_weights(self, bias)
        self.plan: object | None = None  # the method's fit to this machine (kernels/tuning.py)

    def rows(self, shard: str | None) -> tuple[int, int]:
        """(first output row, row count) of a shard; None: the whole layer."""
        if shard is None:
            return 0, self.out_features
        if shard not in self.shard_offsets:
            raise ValueError(f"no shard {shard!r} in a layer of shards {list(self.shard_offsets)}")
        return self.shard_offsets[shard]

    def rank_part(self, tensor: torch.Tensor, shard: str | None, param: str) -> torch.Tensor:
        """This rank's part of a checkpoint tensor for parameter `param` ("weight",
        "bias") and shard `shard` (None: the whole)."""
        if self.tp.size == 1:
            return tensor
        if self.tp_split == ROW:
            if param.endswith("bias"):
                return summed_bias(tensor, self.tp)
            width = self.in_features
            return self.method.columns_of(tensor, self.tp.rank * width, width,
                                          width * self.tp.size)
        parts = {name: (size, self.replicas.get(name, 1))
                 for name, (_, size) in self.shard_offsets.items()} or {"": (self.out_features, 1)}
        return rows_part(tensor, self.tp, parts, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.method.apply(self, x)
        return self.tp.all_reduce(out) if self.tp_split == ROW and self.tp.size > 1 else out


class MergedLinear(Linear):
    """Several projections of the same input in one matmul, loaded shard by shard."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 split: str | None = None, replicas: dict[str, int] | None = None) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias, quant_config,
                         shard_sizes, prefix, split, replicas)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split([size for _, size in self.shard_offsets.values()], dim=-1)
