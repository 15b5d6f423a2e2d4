"""The candidate kernels for quantized layers, on the decoder weights of a model shape
(random weights, every layer's, so that they are read from memory as in a step): bf16
F.linear and kvflow's native dequantize-then-F.linear for int8 and int4 at every batch size,
and up to 16 rows kvflow's bf16 GEMV, its int8 and int4 kernels (float, and with x
quantized to int8: "int8 activations"; the bf16 and int8 GEMVs once per way of reading the
weight the tuning may choose, kvflow/kernels/variants.py), torch._weight_int8pack_mm
and torch._weight_int4pack_mm_for_cpu on its own packing; timed in alternating rounds,
medians in milliseconds for all the weights.

    .venv/bin/python benchmarks/quantized_kernels.py [--shape qwen2.5-0.5b] [--rounds 9]
                                                     [--rows 1 4 8 ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kvflow.bench.hardware import cpuinfo
from kvflow.bench.workload import resolve_named
from kvflow.kernels import cpu_ops, variants
from kvflow.quantization.base import dequantize_buffer
from kvflow.quantization.int4 import blocked_scales, quantize_int4, unpack_int4
from kvflow.quantization.int8 import quantize_int8, weight_block_sums
from kvflow.worker import huge_pages

GROUP = 128
MAX_GEMV_ROWS = 16  # the GEMVs and torch's small-batch kernels are timed up to here


def _decoder_shapes(shape: str) -> list[tuple[int, int]]:
    c = json.loads(resolve_named(shape, "model-shapes").read_text())
    head_dim = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    per_layer = [(q + 2 * kv, c["hidden_size"]), (c["hidden_size"], q),
                 (2 * c["intermediate_size"], c["hidden_size"]),
                 (c["hidden_size"], c["intermediate_size"])]
    return per_layer * c["num_hidden_layers"]


def _torch_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same int4 values in torch's CPU packing and its [groups, out, 2] scales and zeros
    (w = (q - 8) * scale + zero)."""
    packed, scale, offset = quantize_int4(weight, GROUP, torch.bfloat16)
    q = unpack_int4(packed).to(torch.int32)
    zeros = offset.float() + 8 * scale.float()
    scale_zeros = torch.stack([scale.float(), zeros], dim=2).transpose(0, 1).contiguous()
    return (torch._convert_weight_to_int4pack_for_cpu(q, 1),
            scale_zeros.to(torch.bfloat16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    ops = cpu_ops()
    weights = [torch.randn(n, k) / k ** 0.5 for n, k in _decoder_shapes(args.shape)]
    bf16 = [w.bfloat16() for w in weights]
    int8 = [quantize_int8(w, torch.bfloat16) for w in weights]
    int4 = [quantize_int4(w, GROUP, torch.bfloat16) for w in weights]
    int4_blocked = [blocked_scales(s, o) for _, s, o in int4]  # as the engine's plans keep
    int8_sums = [weight_block_sums(q) for q, _ in int8]
    torch4 = [_torch_int4(w) for w in weights]
    # On the pages the engine's weights sit on (kvflow/worker/huge_pages.py).
    huge_pages.collapse(huge_pages.tensors_in([bf16, int8, int4, int4_blocked, int8_sums, torch4]))
    report = {"cpu": cpuinfo().get("model name"), "threads": torch.get_num_threads(),
              "shape": args.shape, "ms": {}}
    for rows in args.rows:
        xs = {k: torch.randn(rows, k).bfloat16() for k in {w.shape[1] for w in weights}}
        runs = {
            "bf16 F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in bf16],
            # Into the per-shape buffers the engine's kernels write to.
            "int8 native dequantize + F.linear": lambda: [F.linear(xs[q.shape[1]], ops.int8_dequantize(
                q, s, dequantize_buffer(q.shape, torch.bfloat16))) for q, s in int8],
            "int4 native dequantize + F.linear": lambda: [F.linear(xs[p.shape[1] * 2], ops.int4_dequantize(
                p, s, o, dequantize_buffer((p.shape[0], p.shape[1] * 2), torch.bfloat16)))
                for p, s, o in int4],
        }
        if rows <= MAX_GEMV_ROWS:
            for v in variants.CANDIDATES:
                runs.update({
                    f"bf16 gemv ({v})": lambda v=v: [
                        ops.gemv(xs[w.shape[1]], w, None, v.streams, v.prefetch) for w in bf16],
                    f"int8 native ({v})": lambda v=v: [
                        ops.int8_gemv(xs[q.shape[1]], q, s, None, v.streams, v.prefetch)
                        for q, s in int8],
                    f"int8 native, int8 activations ({v})": lambda v=v: [
                        ops.int8_gemv_q8(xs[q.shape[1]], q, s, sums, None, v.streams,
                                         v.prefetch)
                        for (q, s), sums in zip(int8, int8_sums)]})
            runs.update({
                "torch._weight_int8pack_mm": lambda: [
                    torch._weight_int8pack_mm(xs[q.shape[1]], q, s) for q, s in int8],
                "int4 native": lambda: [ops.int4_gemv(xs[p.shape[1] * 2], p, s, o, None, b)
                                        for (p, s, o), b in zip(int4, int4_blocked)],
                "int4 native, int8 activations": lambda: [
                    ops.int4_gemv_q8(xs[p.shape[1] * 2], p, b, None)
                    for (p, _, _), b in zip(int4, int4_blocked)],
                "torch._weight_int4pack_mm_for_cpu": lambda: [
                    torch._weight_int4pack_mm_for_cpu(xs[p.shape[1] * 2], p, GROUP, sz)
                    for p, sz in torch4],
            })
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.rounds + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if round_:
                    times[name].append(time.perf_counter() - start)
        report["ms"][rows] = {name: round(statistics.median(t) * 1e3, 2)
                              for name, t in times.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
