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
`ffn_gate_exps`); the parameters' loaders take both (see `expert_loader`), and quantize
them where the method's format asks (int8 and int4: kvflow/quantization/experts.py). On
the CPU every expert of a layer runs in one call of the native kernel (`ExpertPlan`); on
CUDA, in two launches of Triton's (kvflow/kernels/triton_ops/moe.py), which never read the
routing back to the host, so that a CUDA graph can hold the layer.
"""
from __future__ import annotations

import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.kernels.variants import DEFAULT, GemvVariant
from kvflow.layers.activation import ClampedSwiGLU, GeluTanhAndMul, SiluAndMul
from kvflow.layers.linear import Linear
from kvflow.layers.native import NativeKernelHook
from kvflow.distributed.tensor_parallel import COLUMN, current, summed_bias
from kvflow.quantization.base import (PrequantizedWeight, QuantizationConfig, WeightLoader,
                                      add_parameter, checked_copy, quantized_parts)

logger = logging.getLogger(__name__)

SCORINGS = ("softmax", "sigmoid", "topk_softmax")


class TopKRouter(Linear):
    """The router: a linear layer scoring every expert for each token (never quantized:
    a rounded score can change which experts a token reaches), then the top_k of them.

    Scores are float32 softmax (or sigmoid) of the logits, and top-k runs on them, as in
    transformers, so that experts whose scores tie are broken the same way: both take
    torch.topk's order over the same float32 values. gpt-oss's router (`topk_softmax`)
    takes the top-k of the logits and a softmax over those, as its reference does."""

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
        if self.scoring == "topk_softmax":
            top, ids = torch.topk(logits, self.top_k, dim=-1)
            return torch.softmax(top.float(), dim=-1), ids
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


@dataclass(frozen=True)
class ExpertPlan:
    """How an expert layer runs on this machine: every expert in one call of the native
    kernel (`ops.moe_experts`), an expert with at most gemv_max_rows rows in the step
    through the kernel's GEMV loops, one with more through a GEMM (kvflow/kernels/tuning.py
    measures where one starts to win)."""

    ops: ModuleType
    gemv_max_rows: int
    # What the kernel reads beside gate_up's and down's weights (the method's kernel_scales).
    scales: tuple[torch.Tensor | None, torch.Tensor | None]
    activation: tuple[str, float, float]  # the kernel's name for it, alpha, limit
    variant: GemvVariant = DEFAULT  # how the GEMV loops read the weights (not int4's)
    # int8 experts' weight sums per block of x's columns (gate_up's, down's), where the
    # GEMV loops take x quantized to int8 and multiply integers (the method's
    # int8_activation_sums; kvflow/kernels/tuning.py chooses by measuring); None: x as is
    weight_sums: tuple[torch.Tensor, torch.Tensor] | None = None


class ExpertMethod(ABC):
    """How one expert layer stores its experts' weights and computes their outputs."""

    @abstractmethod
    def create_weights(self, layer: FusedMoE, bias: bool) -> None:
        """Register the layer's parameters, each with a weight_loader (see expert_loader)
        and its `shards`."""

    @abstractmethod
    def expert_weight(self, layer: FusedMoE, name: str, expert: int) -> torch.Tensor:
        """One expert's weight of projection `name` ("gate_up_proj" or "down_proj"), [rows,
        columns]: the stored tensor where the model's dtype holds it, else dequantized to
        float32."""

    @abstractmethod
    def kernel_scales(self, layer: FusedMoE) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the native kernel reads beside gate_up's and down's weights: None for
        weights in the model's dtype, int8's scales, int4's scales blocked."""

    def int8_activation_sums(self, layer: FusedMoE
                             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the native kernel's GEMV loops read to take x quantized to int8 (an
        ExpertPlan's weight_sums), or None where the format has no such loops."""
        return None

    def columns_of(self, weight: torch.Tensor, first: int,
                   width: int) -> torch.Tensor | PrequantizedWeight:
        """Input columns [first, first + width) of a down projection's checkpoint weight (one
        expert's [rows, columns] or every expert's stacked), for the tensor-parallel rank
        that holds them; as LinearMethod.columns_of."""
        return weight.narrow(-1, first, width)

    def expert_product(self, layer: FusedMoE, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its rows: x [rows, hidden] -> down(act(gate_up(x))) [rows, hidden]."""

        def project(name: str, rows: torch.Tensor) -> torch.Tensor:
            bias = getattr(layer, f"{name}_bias")
            return F.linear(rows, self.expert_weight(layer, name, expert).to(rows.dtype),
                            None if bias is None else bias[expert])

        return project("down_proj", layer.act(project("gate_up_proj", x)))

    def apply(self, layer: FusedMoE, x: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden], the router's weights and ids [tokens, top_k] -> [tokens, hidden].

        With a plan, the native kernel. Else the PyTorch path: every token's rows grouped
        by expert for the whole step, then one product per expert that has rows (a loop
        over those experts, none over tokens)."""
        plan = layer.plan
        if plan is not None:
            sums = plan.weight_sums or (None, None)
            return plan.ops.moe_experts(x, weights, ids, layer.gate_up_proj, plan.scales[0],
                                        layer.gate_up_proj_bias, layer.down_proj,
                                        plan.scales[1], layer.down_proj_bias, *plan.activation,
                                        plan.gemv_max_rows, plan.variant.streams,
                                        plan.variant.prefetch, *sums)
        groups = ExpertGroups.of(ids, layer.num_experts)
        rows = x[groups.token_ids]
        out = x.new_empty(ids.numel(), layer.hidden_size)  # [tokens * top_k] in choice order
        for expert, start, count in groups.runs:
            out[groups.choice_ids[start:start + count]] = self.expert_product(
                layer, expert, rows[start:start + count])
        return combine_choices(out, weights, x.dtype)


def combine_choices(out: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each choice's expert output, [tokens * top_k, hidden] in choice order, weighted by
    the router's weights [tokens, top_k] and summed per token in its top-k order, in
    float32, rounded once to dtype: a token's sum does not depend on which other tokens
    share the step."""
    weighted = out.view(*weights.shape, out.shape[-1]).float() * weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(dtype)


def _expert_part(layer: FusedMoE, target: torch.Tensor, shard: str | None) -> torch.Tensor:
    """The part of an [experts, rows, ...] tensor that a shard names (see expert_loader)."""
    projection, _, expert = (shard or "").partition(":")
    if projection in ("gate", "up"):
        size = layer.intermediate_size
        target = target.narrow(1, 0 if projection == "gate" else size, size)
    if expert:
        index = int(expert)
        if not 0 <= index < layer.num_experts:
            raise ValueError(f"expert {index} of a layer of {layer.num_experts} experts")
        target = target[index]
    return target


def expert_loader(layer: FusedMoE) -> WeightLoader:
    """A loader for a parameter laid out [experts, rows, ...] (a gate_up parameter's rows
    being gate's then up's). Its shards: "gate:3", "up:3", "down:3" for one expert's
    projection as a checkpoint stores it per expert; "gate" or "up" for that projection of
    every expert, stacked (llama.cpp's ffn_gate_exps); None for the whole parameter
    (transformers' stacked gate_up_proj)."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        checked_copy(_expert_part(layer, param.data, shard), loaded)

    return load


def quantized_expert_loader(layer: FusedMoE, name: str,
                            quantize: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                            suffixes: tuple[str, ...], layout: str) -> WeightLoader:
    """A loader for the expert weight `name` in a quantized format: it takes the shards
    expert_loader takes, quantizes the checkpoint's rows (a stacked tensor's experts as one
    matrix: the formats quantize each row, or groups of a row's columns, on its own, and
    int4's blocks of 16 rows never straddle two experts or gate and up), and writes the
    parts into the parameters `name` + suffix, in the order `quantize` returns them."""

    def load(param: nn.Parameter, loaded: torch.Tensor | PrequantizedWeight,
             shard: str | None) -> None:
        targets = [_expert_part(layer, getattr(layer, name + suffix).data, shard)
                   for suffix in suffixes]
        columns = layer.hidden_size if name == "gate_up_proj" else layer.intermediate_size
        parts = quantized_parts(loaded, quantize, layout, (*targets[0].shape[:-1], columns),
                                param.device)
        for target, part in zip(targets, parts, strict=True):
            if part.numel() != target.numel():
                raise ValueError(f"a part of shape {tuple(part.shape)} for "
                                 f"{tuple(target.shape)}")
            target.copy_(part.reshape(target.shape))

    return load


def add_expert_parameter(layer: FusedMoE, name: str, data: torch.Tensor,
                         projections: tuple[str, ...],
                         loader: WeightLoader | None = None) -> None:
    """An expert parameter with its loader (expert_loader by default) and the per-expert
    shards a checkpoint fills."""
    param = add_parameter(layer, name, data, loader or expert_loader(layer))
    param.shards = tuple(f"{p}:{e}"  # type: ignore[attr-defined]
                         for e in range(layer.num_experts) for p in projections)


def add_expert_biases(layer: FusedMoE, bias: bool) -> None:
    """Each projection's bias, [experts, rows] in the model's dtype in every method, or
    None."""
    for name, rows, _, projections in layer.projections():
        if bias:
            add_expert_parameter(layer, f"{name}_bias", torch.empty(layer.num_experts, rows),
                                 projections)
        else:
            setattr(layer, f"{name}_bias", None)


class UnquantizedExpertMethod(ExpertMethod):
    """Expert weights in the model's dtype."""

    def create_weights(self, layer: FusedMoE, bias: bool) -> None:
        for name, rows, columns, projections in layer.projections():
            add_expert_parameter(layer, name, torch.empty(layer.num_experts, rows, columns),
                                 projections)
        add_expert_biases(layer, bias)

    def expert_weight(self, layer: FusedMoE, name: str, expert: int) -> torch.Tensor:
        return getattr(layer, name)[expert]

    def kernel_scales(self, layer: FusedMoE) -> tuple[None, None]:
        return None, None


def _activation_kernel(act: nn.Module) -> tuple[str, float, float] | None:
    """The native kernel's name for an activation module, with gpt-oss's alpha and limit;
    None for one the kernel lacks."""
    if isinstance(act, ClampedSwiGLU):
        return "clamped_swiglu", act.alpha, act.limit
    names = {SiluAndMul: "silu", GeluTanhAndMul: "gelu_tanh"}
    return (names[type(act)], 0.0, 0.0) if type(act) in names else None


class FusedMoE(nn.Module, NativeKernelHook):
    """The experts of one layer, applied to each token's top-k choices and summed with
    the router's weights. Module and parameter names are transformers' (`experts`,
    `gate_up_proj`, `down_proj`, `*_bias`)."""

    kernel_ops = ("moe_experts",)

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
        self.prefix = prefix
        self.method = (UnquantizedExpertMethod() if quant_config is None
                       else quant_config.expert_method(prefix))
        self.method.create_weights(self, bias)
        # Set by attach_native and kernels/tuning.py; None: the method's PyTorch path.
        self.plan: ExpertPlan | None = None
        # Under tensor parallelism each expert holds its rank's part of the inner width
        # (gate's and up's rows, down's columns); the block sums the outputs over ranks.
        self.tp = current()
        self.tp_split = COLUMN if self.tp.size > 1 else None

    def rank_part(self, tensor: torch.Tensor, shard: str | None, param: str) -> torch.Tensor:
        """This rank's part of a checkpoint tensor for `param` ("gate_up_proj",
        "down_proj_bias", ...) and `shard` (see expert_loader)."""
        if not isinstance(tensor, torch.Tensor):
            raise ValueError("tensor parallelism splits experts stored in floating point; "
                             "this checkpoint's experts are stored quantized (a GGUF file's): "
                             "run it on one rank")
        inner, rank = self.intermediate_size, self.tp.rank
        if param.startswith("down_proj"):
            if param.endswith("bias"):
                return summed_bias(tensor, self.tp)
            return self.method.columns_of(tensor, rank * inner, inner)
        projection, _, expert = (shard or "").partition(":")
        dim = 0 if expert else 1  # one expert's rows, or every expert's stacked
        if projection:
            return tensor.narrow(dim, rank * inner, inner)
        whole = tensor.shape[1] // 2  # the fused gate_up: gate's rows, then up's
        return torch.cat([tensor.narrow(1, rank * inner, inner),
                          tensor.narrow(1, whole + rank * inner, inner)], dim=1)

    def projections(self) -> list[tuple[str, int, int, tuple[str, ...]]]:
        """(name, rows, columns, the shards a checkpoint fills) of each projection."""
        inner, hidden = self.intermediate_size, self.hidden_size
        return [("gate_up_proj", 2 * inner, hidden, ("gate", "up")),
                ("down_proj", hidden, inner, ("down",))]

    def attach_native(self, ops: ModuleType) -> bool:
        """The native kernel, kept where it computes a sample as the PyTorch path does,
        through its GEMV loops at every row count until kvflow/kernels/tuning.py measures
        where its GEMMs start to win."""
        self.plan = None
        activation = _activation_kernel(self.act)
        if activation is None:
            return False
        plan = ExpertPlan(ops, sys.maxsize, self.method.kernel_scales(self), activation)
        if not self.computes_like_pytorch(plan):
            return False
        self.plan = plan
        return True

    def computes_like_pytorch(self, plan: ExpertPlan) -> bool:
        """Whether the kernel, through its GEMV loops and through its GEMMs, computes a
        sample as the PyTorch path does: a kernel this build lacks, or whose layout this
        code has wrong, is never used."""
        tokens, top_k = 6, min(2, self.num_experts)
        generator = torch.Generator().manual_seed(0)
        ids = torch.zeros(tokens, top_k, dtype=torch.long)  # expert 0 takes every token
        if top_k > 1:
            ids[:, 1] = 1 + torch.arange(tokens) % (self.num_experts - 1)
        weights = torch.rand(tokens, top_k, generator=generator)
        parameter = next(p for p in self.parameters() if p.is_floating_point())
        x = torch.randn(tokens, self.hidden_size, generator=generator).to(parameter.dtype)
        x, weights, ids = (t.to(parameter.device) for t in (x, weights, ids))
        expected = self(x, weights, ids).float()
        try:
            for gemv_max_rows in (sys.maxsize, 0):
                self.plan = replace(plan, gemv_max_rows=gemv_max_rows)
                error = (self(x, weights, ids).float() - expected).abs().max().item()
                # Rounding to bf16 moves the sum by about 1% of its scale; a wrong layout
                # by all of it.
                if error > 0.05 * expected.abs().max().item() + 1e-3:
                    logger.warning("the native expert kernel disagrees with the PyTorch path "
                                   "on %s (max error %.3g); it is not used", self.prefix, error)
                    return False
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run is not used
            logger.warning("native expert kernel unavailable for %s: %s", self.prefix, exc)
            return False
        finally:
            self.plan = None
        return True

    @property
    def routes_on_device(self) -> bool:
        """Whether this layer runs without reading its routing back to the host, as a CUDA
        graph needs (its PyTorch path visits only the experts that have rows)."""
        return self.plan is not None and getattr(self.plan.ops, "EXPERTS_ROUTE_ON_DEVICE",
                                                 False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden]; weights, ids [tokens, top_k] from the router."""
        return self.method.apply(self, x, weights, ids)
