"""Fitting the native kernels to a loaded model on this machine.

Each linear shape gets, by measurement:
- how the native GEMV reads the weight (kvflow/kernels/variants.py): each candidate variant
  timed at one row, in alternating rounds, over the shape's weights; likewise for a
  quantized method's GEMVs that take variants;
- the largest batch size up to which the native GEMV beats F.linear (tried at 1, 2, 4 and
  8 rows), measured over all of the shape's weights in turn;
- for larger batches, whether a second copy of the weight beats F.linear on the layer's
  own weight at 128 and 2,048 rows (128 for the LM head, which sees only sampled rows),
  and which: a oneDNN-prepacked copy (`torch.ops.mkldnn._reorder_linear_weight`, what
  inductor's CPU path uses), or for a bf16 weight a float32 copy (on CPUs without bf16
  instructions PyTorch's bf16 matmuls are slower than its float32 ones; the GEMV widens
  in registers and needs no copy). These are measured on a few weights of the shape.

Each expert layer shape (kvflow/layers/moe.py) gets the row count per expert up to which
the native expert kernel's GEMV loops beat its GEMMs (tried at 1 to 64 rows for each of 8
experts, on a few layers); the kernel itself is kept only where it computed a sample as
the PyTorch path does (FusedMoE.attach_native).

Every timed run starts with the CPU's caches emptied of the weights (EVICTION_MIN_BYTES):
a decode step reads each weight from memory, whatever its shape's total.

A copy costs memory, so copies are made only while they fit in a quarter of the available
memory, the shapes with the most weight bytes first. Results are cached per machine beside
`kvflow env`'s ceilings. The glue layers (norms, RoPE, activations) take the native kernels
through their hooks (kvflow/layers/native.py) whenever those are in use."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.cache import cache_root, write_atomically
from kvflow.kernels import variants
from kvflow.kernels.variants import GemvVariant
from kvflow.layers.linear import Linear
from kvflow.layers.moe import ExpertPlan, FusedMoE
from kvflow.layers.native import NativeKernelHook
from kvflow.quantization.base import (INT8_ACTIVATION_DTYPES, QuantizedKernel,
                                      QuantizedLinearMethod, QuantizedPlan)
from kvflow.quantization.unquantized import LinearPlan, UnquantizedLinearMethod
from kvflow.worker import huge_pages
from kvflow.worker.kv_cache import available_host_memory

logger = logging.getLogger(__name__)
T = TypeVar("T")
K = TypeVar("K")

NATIVE_DTYPES = (torch.float32, torch.bfloat16)
GEMV_ROWS = (1, 2, 4, 8, 16)  # batch sizes tried; the GEMV is used up to the last one it wins
GEMM_ROWS = (128, 2048)  # a decode batch and a prefill step
# Large batches are bound by arithmetic, not by reading the weights, so a few weights of a
# shape measure them as well as all of them do.
GEMM_SAMPLE = 4
COPY_MEMORY_FRACTION = 0.25  # of available memory, for all second copies of weights
# Rounds per kernel when choosing among a quantized method's kernels; their medians are
# compared. Close calls (the native int8 kernel against torch._weight_int8pack_mm on a
# down projection) flipped under other load with fewer.
QUANTIZED_ROUNDS = 5
EXPERT_ROWS = (1, 2, 4, 8, 16, 32, 64)  # rows per expert tried; GEMVs up to the last they win
EXPERTS_MEASURED = 8  # experts with rows in each measured call: a top-8 model's decode step
# Weight bytes a GEMV variant is timed over: the shape's weights up to this much, which
# bounds a round on a large shape. (That they come from memory, as in a decode step, is
# EVICTION_MIN_BYTES's work: a small shape's weights all fit in a last-level cache.)
VARIANT_SAMPLE_BYTES = 256 * 2**20
VARIANT_ROUNDS = 7  # alternating rounds per variant; medians compared
# A shape's weights can all fit in the last-level cache (a 0.5B model's 24 q/k/v projections
# are 25 MB in int8, against a Zen 4's 32 MB L3), where a decode step, reading every other
# weight between two of them, never finds them. In cache the kernels rank otherwise: on
# an int8 o projection, float x with 4 rows and a 4 KiB prefetch came within 1 us of the
# best (24.6 against 23.8 us a call) and from memory ran 32% slower than it (47.6 against
# 36.1). So every timed run starts after reading this many bytes of other memory: twice
# the last-level cache, at least EVICTION_MIN_BYTES.
EVICTION_MIN_BYTES = 64 * 2**20


def native_cpu_ops(device: torch.device, dtype: torch.dtype,
                   enforce_eager: bool) -> ModuleType | None:
    """The native kernels where they apply: on the CPU, for float32 and bfloat16, unless
    enforce_eager asks for PyTorch's ops alone."""
    if enforce_eager or device.type != "cpu" or dtype not in NATIVE_DTYPES:
        return None
    from kvflow.kernels import cpu_ops

    return cpu_ops()


def _can_prepack(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    # oneDNN refuses to pack bf16 weights on CPUs without AVX-512 (BW, VL, DQ).
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _packed(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, GEMM_ROWS[0])


@dataclass(frozen=True)
class _Copy:
    """A second copy of a weight that large batches may run on."""

    itemsize: Callable[[torch.dtype], int]  # bytes per weight element
    applies: Callable[[torch.dtype], bool]
    make: Callable[[torch.Tensor], torch.Tensor]
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, copy) -> x @ w.T


COPIES: dict[str, _Copy] = {
    "packed": _Copy(lambda dtype: torch.empty((), dtype=dtype).element_size(), _can_prepack,
                    _packed,
                    lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")),
    "float32": _Copy(lambda dtype: 4, lambda dtype: dtype == torch.bfloat16, lambda w: w.float(),
                     lambda x, w: F.linear(x.float(), w).to(x.dtype)),
}


def _frees_eviction_buffer(tune: Callable[..., None]) -> Callable[..., None]:
    """A tuning that frees the memory its timed runs read in between (_eviction_buffer,
    hundreds of MB) when it ends, by an error too."""
    @functools.wraps(tune)
    def tuning(*args, **kwargs) -> None:
        try:
            tune(*args, **kwargs)
        finally:
            _eviction_buffer.cache_clear()
    return tuning


@_frees_eviction_buffer
def install_native_kernels(model: nn.Module, ops: ModuleType, reserved_bytes: int = 0) -> None:
    """reserved_bytes: memory that will be taken after this (an explicit KV cache size), left
    out of the budget for weight copies."""
    tied_head = getattr(model, "tied_head_weight", None)
    head = getattr(model, "lm_head", None)
    head_weight = tied_head if tied_head is not None else getattr(head, "weight", None)
    # (owner, attribute to set, weight) per linear shape. A tied LM head is the embedding,
    # owned by no Linear; an untied one is the lm_head Linear.
    groups: dict[tuple, list[tuple[object, str, torch.Tensor]]] = defaultdict(list)
    attach_glue(model, ops)
    for module in model.modules():
        if isinstance(module, Linear) and isinstance(module.method, UnquantizedLinearMethod):
            groups[(*module.weight.shape, module.weight.dtype)].append(
                (module, "plan", module.weight))
    if tied_head is not None:
        groups[(*tied_head.shape, tied_head.dtype)].append((model, "lm_head_plan", tied_head))
    cache = _ChoiceCache(ops)
    budget = int(max(0, available_host_memory() - reserved_bytes) * COPY_MEMORY_FRACTION)
    for key in sorted(groups, key=lambda k: -sum(w.numel() for _, _, w in groups[k])):
        out_features, in_features, dtype = key
        members = groups[key]
        weights = [w for _, _, w in members]
        label = f"{out_features}x{in_features}:{str(dtype).removeprefix('torch.')}"
        variant = GemvVariant.parse(cache.get(
            f"gemv variant {label}",
            lambda: str(_fastest_variant(lambda v: _run_gemvs(ops, weights, v)))))
        max_rows = cache.get(f"gemv {label} {variant}",
                             lambda: _gemv_max_rows(weights, ops, variant))
        numel = sum(w.numel() for w in weights)
        affordable = [name for name, copy in COPIES.items()
                      if copy.applies(dtype) and numel * copy.itemsize(dtype) <= budget]
        rows = _gemm_rows(any(w is head_weight for w in weights))
        choice = cache.get(f"large batches {label} from {','.join(affordable)}",
                           lambda: _fastest_copy(weights[:GEMM_SAMPLE], affordable, rows)
                           ) if affordable else ""
        copy = COPIES[choice] if choice else None
        if copy is not None:
            budget -= numel * copy.itemsize(dtype)
        for owner, attribute, weight in members:
            second = copy.make(weight) if copy is not None else None
            bias = getattr(owner, "bias", None) if isinstance(owner, Linear) else None
            setattr(owner, attribute, LinearPlan(
                ops=ops, gemv_max_rows=max_rows, gemv_variant=variant,
                packed_weight=second if choice == "packed" else None,
                float32_weight=second if choice == "float32" else None,
                float32_bias=bias.float() if choice == "float32" and bias is not None else None))
        logger.debug("linear %s: native GEMV (%s) up to %d rows, %s above", label, variant,
                     max_rows, choice or "F.linear")
    for label, layers in _quantized_shapes(model).items():
        _plan_quantized(label, layers, ops, cache, _gemm_rows(head in layers))
    _plan_experts(model, cache)


def install_batch_invariant_kernels(model: nn.Module, ops: ModuleType) -> None:
    """The native kernels whose arithmetic for one row does not depend on the other rows:
    every linear layer through the native GEMV at any batch size (it reduces each output
    in one fixed order, by lanes then across them, whatever the number of rows), quantized
    ones through their method's native GEMV, expert layers through the expert kernel's
    GEMV loops at any row count (as attach_native leaves them); nothing chosen by timing."""
    attach_glue(model, ops)
    for module in model.modules():
        if isinstance(module, Linear) and isinstance(module.method, UnquantizedLinearMethod):
            module.plan = LinearPlan(ops=ops, gemv_max_rows=sys.maxsize)
        elif isinstance(module, Linear) and isinstance(module.method, QuantizedLinearMethod):
            kernel = module.method.kernels.get("native")
            if kernel is None or not kernel.gemv:
                raise ValueError(f"batch_invariant: {type(module.method).__name__} has no "
                                 "native GEMV to run every batch size through")
            weights = kernel.prepare(module) if kernel.prepare is not None else ()
            module.plan = QuantizedPlan(ops, "native", sys.maxsize, "native", weights)
        elif isinstance(module, FusedMoE) and module.plan is None:
            raise ValueError(f"batch_invariant: the native expert kernel is not used for "
                             f"{module.prefix} (see the log), and the PyTorch path's rows "
                             "depend on the batch")
    if getattr(model, "tied_head_weight", None) is not None:
        model.lm_head_plan = LinearPlan(ops=ops, gemv_max_rows=sys.maxsize)


def attach_glue(model: nn.Module, ops: ModuleType) -> None:
    """Every layer with a kernel hook takes its kernel from `ops` (the native CPU kernels,
    or CUDA's Triton glue), or says it runs eager: where `ops` lacks a function the layer
    calls, or the layer turns the kernel down."""
    eager = sorted({type(m).__name__ for m in model.modules()
                    if isinstance(m, NativeKernelHook)
                    and not (m.kernel_ops and all(hasattr(ops, name) for name in m.kernel_ops)
                             and m.attach_native(ops))})
    if eager:
        logger.info("no native kernel for %s: eager PyTorch", ", ".join(eager))


@_frees_eviction_buffer
def install_quantized_kernels(model: nn.Module) -> None:
    """Plans for the quantized layers of a model that runs without the native kernels (on
    CUDA, say): PyTorch's kernels for the method, chosen by measuring on the device at
    every load (a GPU measures them in moments)."""
    head = getattr(model, "lm_head", None)
    for label, layers in _quantized_shapes(model).items():
        _plan_quantized(label, layers, None, _Measured(), _gemm_rows(head in layers))


def _gemm_rows(lm_head: bool) -> tuple[int, ...]:
    """The batch sizes a shape's large-batch kernel is chosen at. The LM head sees only the
    rows being sampled, never a prefill's worth (timing a 151,936-row quantized head at
    2,048 rows took over a minute of a first start)."""
    return GEMM_ROWS[:1] if lm_head else GEMM_ROWS


def _quantized_shapes(model: nn.Module) -> dict[str, list[Linear]]:
    """The quantized layers, grouped by method and parameter shapes."""
    shapes: dict[str, list[Linear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, Linear) and isinstance(module.method, QuantizedLinearMethod):
            label = ",".join(f"{name}{list(p.shape)}:{str(p.dtype).removeprefix('torch.')}"
                             for name, p in module.named_parameters())
            shapes[f"{type(module.method).__name__} {label}"].append(module)
    return shapes


def _plan_quantized(label: str, layers: list[Linear], ops: ModuleType | None,
                    cache: _ChoiceCache | _Measured, gemm_rows: tuple[int, ...]) -> None:
    """A quantized shape's plan, among the method's kernels that run on the layers' device
    and compute the product here: the kernel fastest at gemm_rows (a few weights) among
    those that are not GEMVs for large batches, and below it the kernel fastest at one row
    for batches up to the largest of GEMV_ROWS at which it beat that large-batch kernel
    (all of the shape's weights, read from memory)."""
    method = layers[0].method
    device = layers[0].weight.device
    # The activations' dtype: the model's, which the method keeps its scales in.
    dtype = next(p.dtype for p in layers[0].parameters() if p.is_floating_point())
    prepared = {name: kernel for name, kernel in method.kernels.items()
                if device.type in kernel.devices and (ops is not None or not kernel.native)
                and (kernel.dtypes is None or dtype in kernel.dtypes)}
    copies = {name: _prepared_copies(name, kernel, layers) for name, kernel in prepared.items()}
    usable = [name for name in prepared if copies[name] is not None
              and _computes_the_product(name, layers[0], copies[name][0], ops, dtype)]

    def plan(name: str, small_max_rows: int, large: str, weights: tuple[torch.Tensor, ...],
             ) -> QuantizedPlan:
        return QuantizedPlan(ops, name, small_max_rows, large, weights,
                             chosen.get(name, variants.DEFAULT))

    def variant_of(name: str) -> GemvVariant:
        """The variant of a GEMV kernel fastest at one row over the layers (a sample)."""
        sample = _memory_sample(list(zip(layers, copies[name])), lambda pair: sum(
            p.numel() * p.element_size() for p in pair[0].parameters()))
        x = torch.randn(1, layers[0].in_features, device=device).to(dtype)
        kernel = method.kernels[name]

        def run(variant: GemvVariant) -> None:
            for layer, copy in sample:
                kernel.run(_with_plan(layer, QuantizedPlan(ops, name, 0, name, copy, variant)),
                           x, ops)
        try:
            return _fastest_variant(run)
        finally:
            for layer, _ in sample:
                layer.plan = None

    chosen: dict[str, GemvVariant] = {
        name: GemvVariant.parse(cache.get(f"gemv variant {label} {name}",
                                          lambda name=name: str(variant_of(name))))
        for name in usable if method.kernels[name].variants and ops is not None}

    def seconds(names: list[str], rows: int, subset: list[Linear]) -> dict[str, float]:
        """Median seconds of each kernel over subset, the kernels timed in alternation so
        that other load on the machine falls on all of them alike."""
        x = torch.randn(rows, layers[0].in_features, device=device).to(dtype)
        runs = {name: (lambda name=name: [method.kernels[name].run(
            _with_plan(layer, plan(name, 0, name, copies[name][i])), x, ops)
            for i, layer in enumerate(subset)]) for name in names}
        times: dict[str, list[float]] = defaultdict(list)
        for round_ in range(QUANTIZED_ROUNDS + 1):  # the first round warms up
            for name, run in runs.items():
                took = _seconds(run, device)
                if round_:
                    times[name].append(took)
        return {name: sorted(t)[len(t) // 2] for name, t in times.items()}

    large_candidates = [name for name in usable if not method.kernels[name].gemv]

    def fastest_large() -> str:
        if len(large_candidates) == 1:
            return large_candidates[0]
        totals: dict[str, float] = defaultdict(float)
        for rows in gemm_rows:
            for name, t in seconds(large_candidates, rows, layers[:GEMM_SAMPLE]).items():
                totals[name] += t
        return min(large_candidates, key=totals.__getitem__)

    def small_kernel_and_rows(large: str) -> str:
        """The kernel fastest at one row, and the largest of GEMV_ROWS up to which it beat
        the large-batch kernel at every count. (Stopping where another kernel overtook it
        handed 2-row batches to the large kernel, which dequantizes the whole weight each
        call, at 10x a GEMV's cost.)"""
        if len(usable) == 1:
            return f"{usable[0]}:0"
        measured = seconds(usable, 1, layers)
        small = min(usable, key=measured.__getitem__)
        if small == large or measured[small] >= measured[large]:
            return f"{large}:0"
        best = 1
        for rows in GEMV_ROWS[1:]:
            measured = seconds([small, large], rows, layers)
            if measured[small] >= measured[large]:
                break
            best = rows
        return f"{small}:{best}"

    large = cache.get(f"large batches {label} from {','.join(large_candidates)} at "
                      f"{','.join(map(str, gemm_rows))} rows", fastest_large)
    gemvs = "".join(f" {name} {variant}" for name, variant in chosen.items())
    small, rows = cache.get(f"small batches {label} from {','.join(usable)} against {large}"
                            f"{gemvs}", lambda: small_kernel_and_rows(large)).split(":")
    if small == large:
        rows = "0"
    for i, layer in enumerate(layers):
        # At most one of the two kernels reads a copy: none of the methods has two.
        with_copy = next((name for name in (small, large) if copies[name][i]), "")
        layer.plan = plan(small, int(rows), large, copies[with_copy][i] if with_copy else ())
    logger.debug("linear %s: %s (%s) up to %s rows, %s above", label, small,
                 chosen.get(small, variants.DEFAULT), rows, large)


def _plan_experts(model: nn.Module, cache: _ChoiceCache) -> None:
    """Each expert layer shape that took the native kernel: the rows per expert up to which
    its GEMV loops run, measured on a few layers of the shape."""
    shapes: dict[str, list[FusedMoE]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, FusedMoE) and module.plan is not None:
            label = ",".join(f"{name}{list(p.shape)}:{str(p.dtype).removeprefix('torch.')}"
                             for name, p in module.named_parameters())
            shapes[f"{type(module.method).__name__} {module.plan.activation[0]} {label}"].append(
                module)
    for label, layers in shapes.items():
        variant = variants.DEFAULT
        if layers[0].gate_up_proj.dtype != torch.uint8:  # int4 weights are one stream anyway
            variant = GemvVariant.parse(cache.get(f"expert GEMV variant {label}",
                                                  lambda: str(_expert_variant(layers))))
        first_sums = _int8_activation_sums(layers[0])
        if first_sums is not None:
            # The other layers' sums only where a measurement or the int8 way needs them:
            # not on every start whose cached choice is x as it is.
            @functools.cache
            def sums() -> list[tuple[torch.Tensor, torch.Tensor]]:
                return [first_sums, *(layer.method.int8_activation_sums(layer)
                                      for layer in layers[1:])]

            q8 = GemvVariant.parse(cache.get(
                f"expert GEMV variant {label} int8 activations",
                lambda: str(_expert_variant(layers, sums()))))
            activations = cache.get(
                f"expert activations {label}: {variant} or int8 {q8}",
                lambda: _expert_activations(layers, variant, q8, sums()))
            if activations == "int8":
                variant = q8
                for layer, layer_sums in zip(layers, sums()):
                    layer.plan = replace(layer.plan, weight_sums=layer_sums)
        for layer in layers:
            layer.plan = replace(layer.plan, variant=variant)
        rows = cache.get(f"expert GEMV rows {label} {variant}",
                         lambda: _expert_gemv_max_rows(layers[:GEMM_SAMPLE]))
        for layer in layers:
            layer.plan = replace(layer.plan, gemv_max_rows=rows)
        logger.debug("experts %s: GEMV loops (%s) up to %d rows per expert, GEMMs above",
                     label, variant, rows)


def _int8_activation_sums(layer: FusedMoE) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's weight sums for GEMV loops that take x quantized to int8, where the
    model's dtype allows rounding x so (INT8_ACTIVATION_DTYPES, as for the dense layers),
    the method has such loops and they compute a sample as the PyTorch path does."""
    dtype = next(p.dtype for p in layer.parameters() if p.is_floating_point())
    sums = (layer.method.int8_activation_sums(layer) if dtype in INT8_ACTIVATION_DTYPES
            else None)
    if sums is None:
        return None
    plan = layer.plan
    try:
        return sums if layer.computes_like_pytorch(replace(plan, weight_sums=sums)) else None
    finally:
        layer.plan = plan


def _decode_step(layers: list[FusedMoE]
                 ) -> Callable[[Callable[[int, ExpertPlan], ExpertPlan]], None]:
    """A decode step's shape, one row for each of EXPERTS_MEASURED experts, on the first
    layers up to VARIANT_SAMPLE_BYTES of the weights it reads: step(plan_of) runs it
    with the plan of sampled layer i (the layers' i-th) replaced by plan_of(i, plan), all
    rows through the GEMV loops, then puts the plans back."""
    sample = _memory_sample(layers, lambda layer: sum(
        p.numel() * p.element_size() for p in layer.parameters()) * min(
            EXPERTS_MEASURED, layer.num_experts) // layer.num_experts)
    first = sample[0]
    experts = min(EXPERTS_MEASURED, first.num_experts)
    dtype = next(p.dtype for p in first.parameters() if p.is_floating_point())
    ids = torch.arange(experts)[None, :]
    weights = torch.ones(ids.shape)
    x = torch.randn(1, first.hidden_size).to(dtype)

    def step(plan_of: Callable[[int, ExpertPlan], ExpertPlan]) -> None:
        for i, layer in enumerate(sample):
            plan = layer.plan
            layer.plan = replace(plan_of(i, plan), gemv_max_rows=sys.maxsize)
            try:
                layer(x, weights, ids)
            finally:
                layer.plan = plan
    return step


def _expert_variant(layers: list[FusedMoE],
                    sums: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> GemvVariant:
    """The variant fastest at a decode step (with x quantized to int8, given each layer's
    weight sums)."""
    step = _decode_step(layers)
    return _fastest(variants.CANDIDATES, lambda variant: step(lambda i, plan: replace(
        plan, variant=variant, weight_sums=sums[i] if sums else None)))


def _expert_activations(layers: list[FusedMoE], variant: GemvVariant, q8: GemvVariant,
                        sums: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    """"float" or "int8": whether a decode step ran faster with x as it is (through
    `variant`) or quantized to int8 (through `q8`)."""
    step = _decode_step(layers)
    plans = {"float": lambda i, plan: replace(plan, variant=variant, weight_sums=None),
             "int8": lambda i, plan: replace(plan, variant=q8, weight_sums=sums[i])}
    return _fastest(tuple(plans), lambda name: step(plans[name]))


def _expert_gemv_max_rows(layers: list[FusedMoE]) -> int:
    """The largest of EXPERT_ROWS up to which the kernel's GEMV loops beat its GEMMs at
    every count, each call giving that many rows to each of EXPERTS_MEASURED experts."""
    first = layers[0]
    plans = [layer.plan for layer in layers]
    experts = min(EXPERTS_MEASURED, first.num_experts)
    dtype = next(p.dtype for p in first.parameters() if p.is_floating_point())
    best = 0
    for rows in EXPERT_ROWS:
        ids = torch.arange(experts).repeat_interleave(rows)[:, None]
        weights = torch.ones(ids.shape)
        x = torch.randn(ids.shape[0], first.hidden_size).to(dtype)

        def step_with(gemv_max_rows: int) -> Callable[[], object]:
            """The layers set to run GEMV loops up to gemv_max_rows, as a call to time."""
            for layer, plan in zip(layers, plans):
                layer.plan = replace(plan, gemv_max_rows=gemv_max_rows)
            return lambda: [layer(x, weights, ids) for layer in layers]

        gemms = _median_seconds(step_with(0))
        if _median_seconds(step_with(sys.maxsize)) >= gemms:
            break
        best = rows
    for layer, plan in zip(layers, plans):
        layer.plan = plan
    return best


def _with_plan(layer: Linear, plan: QuantizedPlan) -> Linear:
    layer.plan = plan
    return layer


def _prepared_copies(name: str, kernel: QuantizedKernel,
                     layers: list[Linear]) -> list[tuple[torch.Tensor, ...]] | None:
    """Each layer's copy of its weight in the kernel's layout ((): it reads the layer's
    own), or None where the kernel cannot take the layers."""
    if kernel.prepare is None:
        return [() for _ in layers]
    try:
        copies = [kernel.prepare(layer) for layer in layers]
    except (RuntimeError, ValueError) as exc:
        logger.info("quantized kernel %r unavailable for these layers: %s", name, exc)
        return None
    # On the pages they will be read from when they are timed.
    huge_pages.collapse(t for copy in copies for t in copy)
    return copies


def _computes_the_product(name: str, layer: Linear, copy: tuple[torch.Tensor, ...],
                          ops: ModuleType | None, dtype: torch.dtype) -> bool:
    """Whether the kernel runs here and agrees with the dequantized product: a kernel an
    op of this build lacks, or whose layout this code has wrong, is never chosen."""
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(device=layer.weight.device, dtype=dtype)
    expected = x.float() @ layer.method.dequantize(layer).T
    if layer.bias is not None:
        expected += layer.bias.float()
    try:
        layer.plan = QuantizedPlan(ops, name, 3, name, copy)
        actual = layer.method.kernels[name].run(layer, x, ops).float()
    except Exception as exc:  # an op this build lacks, triton missing or failing to compile
        logger.info("quantized kernel %r unavailable here: %s", name, exc)
        return False
    finally:
        layer.plan = None
    # Rounding x and the output to bf16 moves the product by about 1% of its scale.
    error = (actual - expected).abs().max().item()
    if error > 0.05 * expected.abs().max().item() + 1e-3:
        logger.warning("quantized kernel %r disagrees with the dequantized product here "
                       "(max error %.3g); it is not used", name, error)
        return False
    return True


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _last_level_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache"),
                            ) -> int | None:
    """The largest CPU cache's size, from sysfs; None where it does not say."""
    sizes = []
    for size in caches.glob("index*/size"):
        match = re.fullmatch(r"(\d+)([KMG]?)", size.read_text().strip())
        if match:
            sizes.append(int(match[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match[2]])
    return max(sizes, default=None)


@functools.cache
def _eviction_buffer() -> torch.Tensor:
    """Memory to read between timed runs (see EVICTION_MIN_BYTES); freed after tuning."""
    nbytes = max(EVICTION_MIN_BYTES, 2 * (_last_level_cache_bytes() or 0))
    return torch.ones(nbytes // 4)


def _seconds(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds fn took, started with the CPU's caches holding none of what it reads (on
    the CPU; a GPU's work is timed as it is)."""
    if device is None or device.type == "cpu":
        _eviction_buffer().sum()
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _median_seconds(fn: Callable[[], object]) -> float:
    fn()
    return sorted(_seconds(fn) for _ in range(3))[1]


def _memory_sample(items: list[T], nbytes: Callable[[T], int]) -> list[T]:
    """The first items up to VARIANT_SAMPLE_BYTES in all (at least one)."""
    sample, total = [], 0
    for item in items:
        if sample and total >= VARIANT_SAMPLE_BYTES:
            break
        sample.append(item)
        total += nbytes(item)
    return sample


def _run_gemvs(ops: ModuleType, weights: list[torch.Tensor], variant: GemvVariant) -> None:
    """One row through a sample of the weights with the native GEMV reading them as variant
    says."""
    sample = _memory_sample(weights, lambda w: w.numel() * w.element_size())
    x = torch.randn(1, weights[0].shape[1]).to(weights[0].dtype)
    for w in sample:
        ops.gemv(x, w, None, variant.streams, variant.prefetch)


def _fastest_variant(run: Callable[[GemvVariant], object]) -> GemvVariant:
    return _fastest(variants.CANDIDATES, run)


def _fastest(candidates: Sequence[K], run: Callable[[K], object]) -> K:
    """The candidate under which run was fastest: medians of VARIANT_ROUNDS rounds, the
    candidates timed in alternation so that other load falls on all alike."""
    times: dict[K, list[float]] = defaultdict(list)
    for round_ in range(VARIANT_ROUNDS + 1):  # the first round warms up
        for candidate in candidates:
            took = _seconds(lambda: run(candidate))
            if round_:
                times[candidate].append(took)
    return min(candidates, key=lambda c: sorted(times[c])[len(times[c]) // 2])


def _gemv_max_rows(weights: list[torch.Tensor], ops: ModuleType, variant: GemvVariant) -> int:
    """The largest row count up to which the native GEMV beat F.linear at every count."""
    best = 0
    for rows in GEMV_ROWS:
        x = torch.randn(rows, weights[0].shape[1]).to(weights[0].dtype)
        native = _median_seconds(lambda: [ops.gemv(x, w, None, variant.streams,
                                                   variant.prefetch) for w in weights])
        eager = _median_seconds(lambda: [F.linear(x, w) for w in weights])
        if native >= eager:
            break
        best = rows
    return best


def _fastest_copy(weights: list[torch.Tensor], candidates: list[str],
                  batch_sizes: tuple[int, ...]) -> str:
    """The candidate copy that beat F.linear at every batch size by the most in all, or ""
    if none did. A candidate that fails here (an op this build or CPU lacks) is dropped."""
    best, best_seconds = "", float("inf")
    for name in candidates:
        copy = COPIES[name]
        try:
            copies = [copy.make(w) for w in weights]
            total = 0.0
            for rows in batch_sizes:
                x = torch.randn(rows, weights[0].shape[1]).to(weights[0].dtype)
                seconds = _median_seconds(lambda: [copy.run(x, c) for c in copies])
                if seconds >= _median_seconds(lambda: [F.linear(x, w) for w in weights]):
                    total = float("inf")
                    break
                total += seconds
        except RuntimeError as exc:
            logger.info("weight copy %r unavailable here: %s", name, exc)
            continue
        if total < best_seconds:
            best, best_seconds = name, total
    return best


class _Measured:
    """Choices measured at every load, kept nowhere."""

    def get(self, key: str, measure: Callable[[], int | str]) -> int | str:
        return measure()


class _ChoiceCache:
    """Measured choices in one JSON file per machine, thread count and kernel build."""

    def __init__(self, ops: ModuleType) -> None:
        build = ops.__name__  # kvflow_cpu_ops_<build key>, wherever it was loaded from
        # The constants that shape a choice are part of the key: change one, measure again.
        # So are the pages weights sit on: a GEMV variant that wins on 4 KiB pages may not
        # on 2 MiB ones.
        key = (f"{build}|{torch.get_num_threads()}|{torch.__version__}|{GEMV_ROWS}|"
               f"huge pages {huge_pages.enabled()}|"
               f"{GEMM_ROWS}|{GEMM_SAMPLE}|{sorted(COPIES)}|{QUANTIZED_ROUNDS}|{EXPERT_ROWS}|"
               f"{EXPERTS_MEASURED}|{variants.CANDIDATES}|{VARIANT_SAMPLE_BYTES}|"
               f"{VARIANT_ROUNDS}|evicted {EVICTION_MIN_BYTES}")
        name = f"linear-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
        self.path = cache_root() / "env" / name
        self.choices: dict[str, int | str] = (json.loads(self.path.read_text())
                                              if self.path.exists() else {})
        self.measured = 0  # choices measured by this process

    def get(self, key: str, measure: Callable[[], int | str]) -> int | str:
        if key not in self.choices:
            if not self.measured:
                logger.info("measuring kvflow's kernels on this machine for this model's "
                            "shapes, once (a few seconds per shape; kept in %s)", self.path)
            start = time.monotonic()
            self.choices[key] = measure()
            self.measured += 1
            logger.info("measured %s: %r (%.1f s)", key, self.choices[key],
                        time.monotonic() - start)
            write_atomically(self.path, json.dumps(self.choices, indent=1))
        return self.choices[key]
