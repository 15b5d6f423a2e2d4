"""Fitting the native kernels to a loaded model on this machine.

Each linear shape gets, by measurement:
- the largest batch size up to which the native GEMV beats F.linear (tried at 1, 2, 4
  and 8 rows);
- for larger batches, whether a second copy of the weight beats F.linear on the layer's
  own weight at 128 and 2,048 rows (128 for the LM head, which sees only sampled rows),
  and which: a oneDNN-prepacked copy
  (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU path uses), or for a
  bf16 weight a float32 copy (on CPUs without bf16 instructions, PyTorch's bf16 matmuls
  are slower than its float32 ones; the GEMV widens in registers and needs no copy). A
  copy costs memory, so copies are made only while they fit in a quarter of the
  available memory, the shapes with the most weight bytes first.
The GEMV is measured over all of a shape's weights in turn, so that they are read from
memory as in a real step, not from cache; large batches over a few of them. Results are cached per machine beside
`kvflow env`'s ceilings. The glue layers (norms, RoPE, SiLU) take the native kernels
whenever they are in use."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.layers.activation import SiluAndMul
from kvflow.layers.linear import Linear, LinearPlan
from kvflow.layers.norm import RMSNorm
from kvflow.layers.rotary import RotaryEmbedding
from kvflow.worker.kv_cache import available_host_memory

logger = logging.getLogger(__name__)

NATIVE_DTYPES = (torch.float32, torch.bfloat16)
GEMV_ROWS = (1, 2, 4, 8)  # batch sizes tried; the GEMV is used up to the last one it wins
GEMM_ROWS = (128, 2048)  # a decode batch and a prefill step
# Large batches are bound by arithmetic, not by reading the weights, so a few weights of a
# shape measure them as well as all of them do.
GEMM_SAMPLE = 4
COPY_MEMORY_FRACTION = 0.25  # of available memory, for all second copies of weights


def native_cpu_ops(device: torch.device, dtype: torch.dtype,
                   enforce_eager: bool) -> ModuleType | None:
    """The native kernels where they apply: on the CPU, for float32 and bfloat16, unless
    enforce_eager asks for PyTorch's ops alone."""
    if enforce_eager or device.type != "cpu" or dtype not in NATIVE_DTYPES:
        return None
    from kvflow.kernels import cpu_ops

    return cpu_ops()


def _can_prepack() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packed(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, GEMM_ROWS[0])


# The second copies a large batch may run on: name -> (bytes per weight element, whether
# it applies to a dtype, the copy, one batch through it).
_Copy = tuple[int, Callable[[torch.dtype], bool], Callable[[torch.Tensor], torch.Tensor],
              Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
COPIES: dict[str, _Copy] = {
    "packed": (2, lambda dtype: _can_prepack(), _packed,
               lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")),
    "float32": (4, lambda dtype: dtype == torch.bfloat16, lambda w: w.float(),
                lambda x, w: F.linear(x.float(), w).to(x.dtype)),
}


def install_native_kernels(model: nn.Module, ops: ModuleType) -> None:
    # (owner, attribute to set, weight) per linear shape; the LM head may be the embedding.
    groups: dict[tuple, list[tuple[object, str, torch.Tensor]]] = defaultdict(list)
    owners: dict[int, Linear] = {}
    for module in model.modules():
        if isinstance(module, (RMSNorm, RotaryEmbedding, SiluAndMul)):
            module.native = ops
        elif isinstance(module, Linear):
            groups[(*module.weight.shape, module.weight.dtype)].append(
                (module, "plan", module.weight))
            owners[id(module.weight)] = module
    if hasattr(model, "lm_head_weight"):
        weight = model.lm_head_weight
        groups[(*weight.shape, weight.dtype)].append((model, "lm_head_plan", weight))
    cache = _ChoiceCache(ops)
    budget = int(available_host_memory() * COPY_MEMORY_FRACTION)
    for key in sorted(groups, key=lambda k: -sum(w.numel() for _, _, w in groups[k])):
        out_features, in_features, dtype = key
        members = groups[key]
        weights = [w for _, _, w in members]
        label = f"{out_features}x{in_features}:{str(dtype).removeprefix('torch.')}"
        max_rows = cache.get(f"gemv {label}", lambda: _gemv_max_rows(weights, ops))
        numel = sum(w.numel() for w in weights)
        affordable = [name for name, (size, applies, _, _) in COPIES.items()
                      if applies(dtype) and numel * size <= budget]
        # The LM head sees only the rows being sampled, never a prefill's worth.
        is_head = any(attribute == "lm_head_plan" for _, attribute, _ in members)
        rows = GEMM_ROWS[:1] if is_head else GEMM_ROWS
        choice = cache.get(f"large batches {label}",
                           lambda: _fastest_copy(weights[:GEMM_SAMPLE], affordable, rows)
                           ) if affordable else ""
        if choice not in affordable:  # cached on a machine state with more free memory
            choice = ""
        if choice:
            budget -= numel * COPIES[choice][0]
        make_copy = COPIES[choice][2] if choice else None
        for owner, attribute, weight in members:
            copy = make_copy(weight) if make_copy else None
            bias = getattr(owners.get(id(weight)), "bias", None)
            setattr(owner, attribute, LinearPlan(
                ops=ops, gemv_max_rows=max_rows,
                packed_weight=copy if choice == "packed" else None,
                float32_weight=copy if choice == "float32" else None,
                float32_bias=bias.float() if choice == "float32" and bias is not None else None))
        logger.debug("linear %s: native GEMV up to %d rows, %s above", label, max_rows,
                     choice or "F.linear")


def _median_seconds(fn: Callable[[], object]) -> float:
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def _gemv_max_rows(weights: list[torch.Tensor], ops: ModuleType) -> int:
    """The largest row count up to which the native GEMV beat F.linear at every count."""
    best = 0
    for rows in GEMV_ROWS:
        x = torch.randn(rows, weights[0].shape[1]).to(weights[0].dtype)
        native = _median_seconds(lambda: [ops.gemv(x, w, None) for w in weights])
        eager = _median_seconds(lambda: [F.linear(x, w) for w in weights])
        if native >= eager:
            break
        best = rows
    return best


def _fastest_copy(weights: list[torch.Tensor], candidates: list[str],
                  batch_sizes: tuple[int, ...]) -> str:
    """The candidate copy that beat F.linear at every batch size by the most in all, or ""
    if none did."""
    best, best_seconds = "", float("inf")
    for name in candidates:
        _, _, make_copy, run = COPIES[name]
        copies = [make_copy(w) for w in weights]
        total = 0.0
        for rows in batch_sizes:
            x = torch.randn(rows, weights[0].shape[1]).to(weights[0].dtype)
            seconds = _median_seconds(lambda: [run(x, c) for c in copies])
            if seconds >= _median_seconds(lambda: [F.linear(x, w) for w in weights]):
                total = float("inf")
                break
            total += seconds
        if total < best_seconds:
            best, best_seconds = name, total
        del copies
    return best


class _ChoiceCache:
    """Measured choices in one JSON file per machine, thread count and kernel build."""

    def __init__(self, ops: ModuleType) -> None:
        from kvflow.demo import cache_root

        build = Path(ops.__file__).parent.name
        key = f"{build}|{torch.get_num_threads()}|{torch.__version__}|copies"
        name = f"linear-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
        self.path = cache_root() / "env" / name
        self.choices: dict[str, int | str] = (json.loads(self.path.read_text())
                                              if self.path.exists() else {})

    def get(self, key: str, measure: Callable[[], int | str]) -> int | str:
        if key not in self.choices:
            self.choices[key] = measure()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(self.choices, indent=1))
            os.replace(partial, self.path)
        return self.choices[key]
