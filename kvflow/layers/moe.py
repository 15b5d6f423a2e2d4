"""The expert layer of mixture-of-experts models, beside `Linear`: a router that picks each
token's top-k experts, and `FusedMoE`, which holds every expert's weights as one tensor per
projection ([experts, 2 * intermediate, hidden] for gate and up, fused; [experts, hidden,
intermediate] for down) and computes their weighted sum per token.

As a `Linear` takes its parameters and product from a `LinearMethod`, a `FusedMoE` takes
them from an `ExpertMethod`, chosen by the model's quantization config, so that weight
formats, fused kernels and the experts' device change the method and never the family
files. Checkpoints hold experts one tensor per expert and projection (Qwen's
`mlp.experts.3.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.3.w1.weight`) or
stacked across experts (transformers' `mlp.experts.gate_up_proj`, llama.cpp's
`ffn_gate_exps`); the parameters' loaders take both (see `expert_loader`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from kvflow.layers.linear import Linear
from kvflow.layers.native import NativeKernelHook
from kvflow.quantization.base import QuantizationConfig, WeightLoader, add_parameter, checked_copy
from kvflow.quantization.unquantized import LinearPlan, apply_linear

SCORINGS = ("softmax", "sigmoid")


class TopKRouter(Linear):
    """The router: a linear layer scoring every expert for each token (never quantized:
    a rounded score can change which experts a token reaches), then the top_k of them.

    Scores are float32 softmax (or sigmoid) of the logits, and top-k runs on them, as in
    transformers, so that experts whose scores tie are broken the same way: both take
    torch.topk's order over the same float32 values."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, scoring: str,
                 renormalize: bool, bias: bool = False, prefix: str = "") -> None:
        """renormalize: scale the chosen scores to sum to 1 (transformers' norm_topk_prob)."""
        if scoring not in SCORINGS:
            raise ValueError(f"router scoring {scoring!r} is not one of {SCORINGS}")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} of {num_experts} experts")
        super().__init__(hidden_size, num_experts, bias, None, prefix=prefix)
        self.top_k = top_k
        self.scoring = scoring
        self.renormalize = renormalize

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> (weights [tokens, top_k] float32, expert ids [tokens, top_k]
        int64), each token's experts in falling score order."""
        logits = self(x)
        scores = (torch.softmax(logits, dim=-1, dtype=torch.float32) if self.scoring == "softmax"
                  else torch.sigmoid(logits.float()))
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


@dataclass(frozen=True)
class ExpertGroups:
    """A step's (token, expert) choices sorted by expert, so that each expert's tokens are
    one run of consecutive rows: its whole batch for the step, in one product."""

    token_ids: torch.Tensor  # [tokens * top_k] the token of each sorted row
    choice_ids: torch.Tensor  # [tokens * top_k] each sorted row's index in ids.flatten()
    runs: list[tuple[int, int, int]]  # (expert, first row, rows) of the experts with rows

    @classmethod
    def of(cls, ids: torch.Tensor, num_experts: int) -> ExpertGroups:
        """ids [tokens, top_k] -> the groups; one sort, and one read of the counts to the
        host (which experts the loop visits)."""
        flat = ids.flatten()
        choice_ids = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        runs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                runs.append((expert, start, count))
                start += count
        return cls(choice_ids // ids.shape[1], choice_ids, runs)


class ExpertMethod(ABC):
    """How one expert layer stores its experts' weights and computes their outputs."""

    @abstractmethod
    def create_weights(self, layer: FusedMoE, bias: bool) -> None:
        """Register the layer's parameters, each with a weight_loader (see expert_loader)
        and its `shards`."""

    @abstractmethod
    def expert_product(self, layer: FusedMoE, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its rows: x [rows, hidden] -> down(act(gate_up(x))) [rows, hidden]."""

    def apply(self, layer: FusedMoE, x: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden], the router's weights and ids [tokens, top_k] -> [tokens, hidden].

        The PyTorch path: every token's rows grouped by expert for the whole step, then one
        product per expert that has rows (a loop over those experts, none over tokens). A
        fused kernel, one call for every expert spread across threads, is a method that
        overrides this."""
        groups = ExpertGroups.of(ids, layer.num_experts)
        rows = x[groups.token_ids]
        out = x.new_empty(ids.numel(), layer.hidden_size)  # [tokens * top_k] in choice order
        for expert, start, count in groups.runs:
            out[groups.choice_ids[start:start + count]] = self.expert_product(
                layer, expert, rows[start:start + count])
        # Summed per token in its top-k order, in float32, rounded once: a token's sum does
        # not depend on which other tokens share the step.
        out = out.view(*ids.shape, layer.hidden_size).float() * weights.unsqueeze(-1)
        return out.sum(dim=1).to(x.dtype)


def expert_loader(layer: FusedMoE) -> WeightLoader:
    """A loader for a parameter laid out [experts, rows, ...] (a gate_up parameter's rows
    being gate's then up's). Its shards: "gate:3", "up:3", "down:3" for one expert's
    projection as a checkpoint stores it per expert; "gate" or "up" for that projection of
    every expert, stacked (llama.cpp's ffn_gate_exps); None for the whole parameter
    (transformers' stacked gate_up_proj)."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        target = param.data
        projection, _, expert = (shard or "").partition(":")
        if projection in ("gate", "up"):
            size = layer.intermediate_size
            target = target.narrow(1, 0 if projection == "gate" else size, size)
        if expert:
            index = int(expert)
            if not 0 <= index < layer.num_experts:
                raise ValueError(f"expert {index} of a layer of {layer.num_experts} experts")
            target = target[index]
        checked_copy(target, loaded)

    return load


def add_expert_parameter(layer: FusedMoE, name: str, data: torch.Tensor,
                         projections: tuple[str, ...]) -> None:
    """An expert parameter with its loader and the per-expert shards a checkpoint fills."""
    param = add_parameter(layer, name, data, expert_loader(layer))
    param.shards = tuple(f"{p}:{e}"  # type: ignore[attr-defined]
                         for e in range(layer.num_experts) for p in projections)


class UnquantizedExpertMethod(ExpertMethod):
    """Expert weights in the model's dtype. With a plan (batch-invariant mode), every
    expert's rows go through the native GEMV, whose rows do not depend on each other."""

    def create_weights(self, layer: FusedMoE, bias: bool) -> None:
        experts, hidden, inner = layer.num_experts, layer.hidden_size, layer.intermediate_size
        add_expert_parameter(layer, "gate_up_proj", torch.empty(experts, 2 * inner, hidden),
                             ("gate", "up"))
        add_expert_parameter(layer, "down_proj", torch.empty(experts, hidden, inner), ("down",))
        if bias:
            add_expert_parameter(layer, "gate_up_proj_bias", torch.empty(experts, 2 * inner),
                                 ("gate", "up"))
            add_expert_parameter(layer, "down_proj_bias", torch.empty(experts, hidden),
                                 ("down",))
        else:
            layer.gate_up_proj_bias = layer.down_proj_bias = None

    def expert_product(self, layer: FusedMoE, expert: int, x: torch.Tensor) -> torch.Tensor:
        def bias(param: torch.Tensor | None) -> torch.Tensor | None:
            return None if param is None else param[expert]

        gate_up = apply_linear(x, layer.gate_up_proj[expert], bias(layer.gate_up_proj_bias),
                               layer.plan)
        return apply_linear(layer.act(gate_up), layer.down_proj[expert],
                            bias(layer.down_proj_bias), layer.plan)


class FusedMoE(nn.Module, NativeKernelHook):
    """The experts of one layer, applied to each token's top-k choices and summed with
    the router's weights. Module and parameter names are transformers' (`experts`,
    `gate_up_proj`, `down_proj`, `*_bias`)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: nn.Module, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        """activation: [rows, 2 * intermediate] (gate then up) -> [rows, intermediate];
        prefix: the layer's name, which a quantization config may choose its method by."""
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act = activation
        self.method = (UnquantizedExpertMethod() if quant_config is None
                       else quant_config.expert_method(prefix))
        self.method.create_weights(self, bias)
        # Set in batch-invariant mode (kvflow/kernels/tuning.py): the GEMV for every expert.
        self.plan: LinearPlan | None = None

    def attach_native(self, ops: ModuleType) -> bool:
        return False  # no native expert kernel yet: the method's PyTorch path

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden]; weights, ids [tokens, top_k] from the router."""
        return self.method.apply(self, x, weights, ids)
