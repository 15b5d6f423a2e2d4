"""One mixture-of-experts layer of the Qwen3-30B-A3B shape (128 experts, top-8, hidden
2048, expert width 768; ../shared/model-shapes/qwen3-30b-a3b-8-layers.json), random
weights, in bf16, int8 and int4 (quantized at load as `--quantization` does): the native
expert kernel against the PyTorch path (one product per expert with rows; int8 and int4
experts dequantized one at a time), for one token (a decode step) and 512 tokens (a
prefill chunk). The kernel runs with every expert through its GEMV loops (once per way of
reading the weights the tuning may choose, kvflow/kernels/variants.py; for int8, with x as
it is and with x quantized to int8, whose loops multiply integers), and with every expert
through its GEMMs; the engine takes the GEMVs up to the row count per expert that tuning
measured and the GEMMs above it.

    .venv/bin/python benchmarks/moe_kernel.py [--rounds 5] [--formats bf16,int8,int4]

Reports the median milliseconds per call and GB/s of the active experts' bytes (each
expert with a row in the call read once: its weights and scales). Every call routes its
tokens anew (a random top-8 per token, seeded), so that a decode step's 8 experts come
from memory, not from the cache; the paths are timed in alternation, so that other load
on the machine falls on all of them alike. A benchmark, not a test: the numbers belong
to the machine and its load."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from kvflow.bench.hardware import cpuinfo
from kvflow.kernels import cpu_ops, variants
from kvflow.layers.activation import SiluAndMul
from kvflow.layers.moe import FusedMoE
from kvflow.models.loader import default_dtype
from kvflow.quantization.int4 import Int4Config
from kvflow.quantization.int8 import Int8Config

SHAPE = Path(__file__).resolve().parents[2] / "shared" / "model-shapes" / \
    "qwen3-30b-a3b-8-layers.json"
FORMATS = {"bf16": None, "int8": Int8Config(), "int4": Int4Config(128)}
TOKENS = {"decode": 1, "prefill": 512}
# path -> (gemv_max_rows, how the GEMV loops read the weights, x quantized to int8);
# None: the PyTorch path.
PATHS = {"pytorch": None,
         **{f"native GEMVs ({v})": (sys.maxsize, v, False) for v in variants.CANDIDATES},
         **{f"native GEMVs, int8 x ({v})": (sys.maxsize, v, True)
            for v in variants.CANDIDATES},
         "native GEMMs": (0, variants.DEFAULT, False)}


def build_layer(shape: dict, fmt: str) -> FusedMoE:
    """The layer with random bf16 weights, loaded (and quantized) one expert at a time."""
    experts, hidden, inner = (shape["num_experts"], shape["hidden_size"],
                              shape["moe_intermediate_size"])
    with default_dtype(torch.bfloat16):
        layer = FusedMoE(experts, hidden, inner, SiluAndMul(), quant_config=FORMATS[fmt],
                         prefix="experts")
    generator = torch.Generator().manual_seed(0)
    for expert in range(experts):
        for name, shard, rows, columns in [("gate_up_proj", "gate", inner, hidden),
                                           ("gate_up_proj", "up", inner, hidden),
                                           ("down_proj", "down", hidden, inner)]:
            weight = torch.randn(rows, columns, generator=generator) * columns ** -0.5
            param = getattr(layer, name)
            param.weight_loader(param, weight.to(torch.bfloat16), f"{shard}:{expert}")
    return layer


def routings(shape: dict, tokens: int, count: int) -> list[tuple[torch.Tensor, ...]]:
    """count (x, weights, ids) for `tokens` tokens, each token's top-k drawn at random."""
    generator = torch.Generator().manual_seed(tokens)
    made = []
    for _ in range(count):
        scores = torch.rand(tokens, shape["num_experts"], generator=generator)
        weights, ids = scores.topk(shape["num_experts_per_tok"], dim=-1)
        x = torch.randn(tokens, shape["hidden_size"], generator=generator)
        made.append((x.to(torch.bfloat16), weights / weights.sum(-1, keepdim=True), ids))
    return made


def expert_bytes(layer: FusedMoE) -> float:
    """One expert's bytes as the kernel reads them: weights, scales and offsets."""
    return sum(p.numel() * p.element_size() for p in layer.parameters()) / layer.num_experts


def measure(layer: FusedMoE, shape: dict, tokens: int, rounds: int) -> dict[str, dict]:
    calls = routings(shape, tokens, rounds + 1)  # the first warms up
    native = layer.plan
    sums = layer.method.int8_activation_sums(layer)
    paths = {path: native_path for path, native_path in PATHS.items()
             if native_path is None or not native_path[2] or sums is not None}
    times: dict[str, list[float]] = {path: [] for path in paths}
    with torch.inference_mode():
        for round_, (x, weights, ids) in enumerate(calls):
            for path, native_path in paths.items():
                layer.plan = None if native_path is None else replace(
                    native, gemv_max_rows=native_path[0], variant=native_path[1],
                    weight_sums=sums if native_path[2] else None)
                start = time.perf_counter()
                layer(x, weights, ids)
                if round_:
                    times[path].append(time.perf_counter() - start)
    layer.plan = native
    active = statistics.mean(ids.unique().numel() for _, _, ids in calls[1:])
    active_bytes = active * expert_bytes(layer)
    return {path: {"ms": 1e3 * statistics.median(t),
                   "GB/s": active_bytes / statistics.median(t) / 1e9}
            for path, t in times.items()} | {"active experts": active,
                                              "active MB": active_bytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=Path, default=SHAPE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args()
    shape = json.loads(args.shape.read_text())
    ops = cpu_ops()
    if ops is None:
        raise SystemExit("the native kernels did not build here (see the log)")
    print(f"CPU: {cpuinfo().get('model name', '?')}, {torch.get_num_threads()} threads, "
          f"kernels {ops.vector_paths()}, torch {torch.__version__}")
    print(f"shape: {shape['num_experts']} experts, top-{shape['num_experts_per_tok']}, hidden "
          f"{shape['hidden_size']}, expert width {shape['moe_intermediate_size']}")
    print("| format | tokens | active experts (MB) | " + " | ".join(
        f"{path} ms (GB/s)" for path in PATHS) + " |")
    print("|" + " --- |" * (3 + len(PATHS)))
    for fmt in args.formats.split(","):
        layer = build_layer(shape, fmt)
        if not layer.attach_native(ops):
            raise SystemExit(f"the native kernel disagreed with the PyTorch path on {fmt}")
        for label, tokens in TOKENS.items():
            result = measure(layer, shape, tokens, args.rounds)
            cells = " | ".join(f"{result[path]['ms']:.2f} ({result[path]['GB/s']:.1f})"
                               if path in result else "-" for path in PATHS)
            print(f"| {fmt} | {tokens} ({label}) | {result['active experts']:.0f} "
                  f"({result['active MB']:.0f}) | {cells} |", flush=True)
        del layer


if __name__ == "__main__":
    main()
