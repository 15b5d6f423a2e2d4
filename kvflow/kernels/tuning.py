"""Fitting the native kernels to a loaded model on this machine.

Each linear shape gets the faster of F.linear and the native GEMV for each small batch
size, measured once per machine (over all of a shape's weights in turn, so that they are
read from memory as in a real step, not from cache) and cached beside `kvflow env`'s
ceilings. The glue layers (norms, RoPE, SiLU) take the native kernels whenever they are
in use."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.layers.activation import SiluAndMul
from kvflow.layers.linear import GemvChoice, Linear
from kvflow.layers.norm import RMSNorm
from kvflow.layers.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)

NATIVE_DTYPES = (torch.float32, torch.bfloat16)
ROW_COUNTS = (1, 2, 4, 8)  # batch sizes tried; the GEMV is used up to the last one it wins


def native_cpu_ops(device: torch.device, dtype: torch.dtype,
                   enforce_eager: bool) -> ModuleType | None:
    """The native kernels where they apply: on the CPU, for float32 and bfloat16, unless
    enforce_eager asks for PyTorch's ops alone."""
    if enforce_eager or device.type != "cpu" or dtype not in NATIVE_DTYPES:
        return None
    from kvflow.kernels import cpu_ops

    return cpu_ops()


def install_native_kernels(model: nn.Module, ops: ModuleType) -> None:
    groups: dict[tuple, list[tuple[object, str, torch.Tensor]]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, (RMSNorm, RotaryEmbedding, SiluAndMul)):
            module.native = ops
        elif isinstance(module, Linear):
            groups[(*module.weight.shape, module.weight.dtype)].append(
                (module, "gemv", module.weight))
    if hasattr(model, "lm_head_weight"):
        weight = model.lm_head_weight
        groups[(*weight.shape, weight.dtype)].append((model, "lm_head_gemv", weight))
    cache = _ChoiceCache(ops)
    for (out_features, in_features, dtype), members in groups.items():
        max_rows = cache.get(out_features, in_features, dtype,
                             lambda: _measure([w for _, _, w in members], ops))
        choice = GemvChoice(ops, max_rows) if max_rows else None
        for owner, attribute, _ in members:
            setattr(owner, attribute, choice)
        logger.debug("linear %dx%d %s: native GEMV up to %d rows", out_features, in_features,
                     dtype, max_rows)


def _median_seconds(fn) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def _measure(weights: list[torch.Tensor], ops: ModuleType) -> int:
    """The largest row count up to which the native GEMV beat F.linear at every count."""
    best = 0
    for rows in ROW_COUNTS:
        x = torch.randn(rows, weights[0].shape[1]).to(weights[0].dtype)
        native = _median_seconds(lambda: [ops.gemv(x, w, None) for w in weights])
        eager = _median_seconds(lambda: [F.linear(x, w) for w in weights])
        if native >= eager:
            break
        best = rows
    return best


class _ChoiceCache:
    """{shape key: max_rows} in one JSON file per machine, thread count and kernel build."""

    def __init__(self, ops: ModuleType) -> None:
        from kvflow.demo import cache_root

        build = Path(ops.__file__).parent.name
        key = f"{build}|{torch.get_num_threads()}|{torch.__version__}"
        name = f"gemv-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
        self.path = cache_root() / "env" / name
        self.choices: dict[str, int] = (json.loads(self.path.read_text())
                                        if self.path.exists() else {})

    def get(self, out_features: int, in_features: int, dtype: torch.dtype, measure) -> int:  # noqa: ANN001
        key = f"{out_features}x{in_features}:{str(dtype).removeprefix('torch.')}"
        if key not in self.choices:
            self.choices[key] = measure()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(self.choices, indent=1))
            os.replace(partial, self.path)
        return self.choices[key]
