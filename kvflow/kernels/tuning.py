"""Fitting the native kernels to a loaded model on this machine.

Each linear shape gets, by measurement:
- the largest batch size up to which the native GEMV beats F.linear (tried at 1, 2, 4
  and 8 rows);
- for larger batches, whether a oneDNN-prepacked copy of the weight
  (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU path uses) beats
  F.linear at 128 and 2,048 rows. A packed copy costs as much memory as the weight, so
  copies are made only while they fit in a quarter of the available memory.
Every measurement runs over all of a shape's weights in turn, so that they are read from
memory as in a real step, not from cache. Results are cached per machine beside
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
PACKED_MEMORY_FRACTION = 0.25


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


def install_native_kernels(model: nn.Module, ops: ModuleType) -> None:
    # (owner, attribute to set, weight) per linear shape; the LM head may be the embedding.
    groups: dict[tuple, list[tuple[object, str, torch.Tensor]]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, (RMSNorm, RotaryEmbedding, SiluAndMul)):
            module.native = ops
        elif isinstance(module, Linear):
            groups[(*module.weight.shape, module.weight.dtype)].append(
                (module, "plan", module.weight))
    if hasattr(model, "lm_head_weight"):
        weight = model.lm_head_weight
        groups[(*weight.shape, weight.dtype)].append((model, "lm_head_plan", weight))
    cache = _ChoiceCache(ops)
    pack_budget = int(available_host_memory() * PACKED_MEMORY_FRACTION) if _can_prepack() else 0
    # Shapes with the most weight bytes first: they gain the most from packing.
    for key in sorted(groups, key=lambda k: -sum(w.numel() for _, _, w in groups[k])):
        out_features, in_features, dtype = key
        members = groups[key]
        weights = [w for _, _, w in members]
        label = f"{out_features}x{in_features}:{str(dtype).removeprefix('torch.')}"
        max_rows = cache.get(f"gemv {label}", lambda: _gemv_max_rows(weights, ops))
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        pack = (nbytes <= pack_budget
                and cache.get(f"packed {label}", lambda: int(_packed_is_faster(weights))))
        if pack:
            pack_budget -= nbytes
        for owner, attribute, weight in members:
            setattr(owner, attribute, LinearPlan(ops=ops, gemv_max_rows=max_rows,
                                                 packed_weight=_packed(weight) if pack else None))
        logger.debug("linear %s: native GEMV up to %d rows, %s above", label, max_rows,
                     "prepacked oneDNN" if pack else "F.linear")


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


def _packed_is_faster(weights: list[torch.Tensor]) -> bool:
    """Whether the prepacked weights beat F.linear at every GEMM_ROWS batch size."""
    packed = [_packed(w) for w in weights]
    for rows in GEMM_ROWS:
        x = torch.randn(rows, weights[0].shape[1]).to(weights[0].dtype)
        prepacked = _median_seconds(lambda: [
            torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed])
        eager = _median_seconds(lambda: [F.linear(x, w) for w in weights])
        if prepacked >= eager:
            return False
    return True


class _ChoiceCache:
    """Measured choices in one JSON file per machine, thread count and kernel build."""

    def __init__(self, ops: ModuleType) -> None:
        from kvflow.demo import cache_root

        build = Path(ops.__file__).parent.name
        key = f"{build}|{torch.get_num_threads()}|{torch.__version__}"
        name = f"linear-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
        self.path = cache_root() / "env" / name
        self.choices: dict[str, int] = (json.loads(self.path.read_text())
                                        if self.path.exists() else {})

    def get(self, key: str, measure: Callable[[], int]) -> int:
        if key not in self.choices:
            self.choices[key] = measure()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(self.choices, indent=1))
            os.replace(partial, self.path)
        return self.choices[key]
