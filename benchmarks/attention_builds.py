"""Two builds of the native paged_attention alternated in one process, on one model shape:
prefill and decode steps, paired ratios per round (a shared host's speed drifts).

    python benchmarks/attention_builds.py OLD.so [NEW.so]

A build is a kvflow_cpu_ops_*.so from ~/.cache/kvflow/kernels (another commit's: check it
out in a worktree and import kvflow.kernels.cpu_ops there); NEW defaults to this checkout's.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from types import ModuleType

import torch

from kvflow.kernels import cpu_ops

# (name, query tokens per request, context per request, requests, calls per round)
CASES = [("prefill 512", 512, 512, 1, 5), ("prefill 2048", 2048, 2048, 1, 3),
         ("decode at context 200", 1, 200, 1, 200), ("decode at context 1000", 1, 1000, 1, 200),
         ("16 decodes at context 300", 1, 300, 16, 50)]


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.rsplit("/", 1)[-1].split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("new", nargs="?")
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    ns = parser.parse_args()
    builds = {"old": load(ns.old), "new": load(ns.new) if ns.new else cpu_ops()}
    torch.manual_seed(0)
    dim, bs = ns.head_dim, ns.block_size
    print(f"# {torch.get_num_threads()} threads; {ns.heads} heads, {ns.kv_heads} kv heads of "
          f"{dim}, bf16, blocks of {bs}")
    for name, tokens, context, reqs, calls in CASES:
        blocks = -(-context // bs)
        q = torch.randn(tokens * reqs, ns.heads, dim, dtype=torch.bfloat16)
        k_cache = torch.randn(blocks * reqs, ns.kv_heads, dim, bs, dtype=torch.bfloat16)
        v_cache = torch.randn(blocks * reqs, ns.kv_heads, bs, dim, dtype=torch.bfloat16)
        table = torch.arange(blocks * reqs, dtype=torch.int32).view(reqs, blocks)
        seq_lens = torch.full((reqs,), context, dtype=torch.int32)
        starts = torch.arange(reqs + 1, dtype=torch.int32) * tokens

        def attend(ops: ModuleType) -> torch.Tensor:
            out = torch.empty_like(q)
            ops.paged_attention(out, q, k_cache, v_cache, table, seq_lens, starts, dim ** -0.5,
                                0, True, 0.0, None)
            return out

        diff = (attend(builds["old"]).float() - attend(builds["new"]).float()).abs().max()
        seconds: dict[str, list[float]] = {label: [] for label in builds}
        for _ in range(ns.rounds):
            for label, ops in builds.items():
                start = time.perf_counter()
                for _ in range(calls):
                    attend(ops)
                seconds[label].append((time.perf_counter() - start) / calls)
        ratio = statistics.median(a / b for a, b in zip(seconds["old"], seconds["new"]))
        old, new = (1e3 * statistics.median(seconds[label]) for label in ("old", "new"))
        print(f"{name}: old {old:.3f} ms, new {new:.3f} ms, paired {ratio:.2f}x "
              f"(max |difference| {diff:.1e})")


if __name__ == "__main__":
    main()
