"""Two builds of the native kernels alternated in one process, on whole decode steps: one
engine per build over the same model, single-stream decode rounds taken in turn, paired
ratios per round (a shared host's speed drifts within minutes, so builds timed apart
cannot be compared). Both builds run on the old one's kernel choices unless --own-plans.

    python benchmarks/decode_builds.py --model PATH OLD.so [NEW.so] [--quantization int4]
        [--quantize-lm-head] [--rounds 8] [--tokens 48]

A build is a kvflow_cpu_ops_*.so from ~/.cache/kvflow/kernels (another commit's: check it
out in a worktree and import kvflow.kernels.cpu_ops there); NEW defaults to this checkout's.
"""
from __future__ import annotations

import argparse
import statistics
from types import ModuleType
from unittest import mock

import torch

import kvflow.kernels
from kvflow import LLM
from kvflow.bench.hardware import inventory
from kvflow.kernels.tuning import _ChoiceCache

from attention_builds import load
from cpu_graphs import decode_steps


def engine(args: argparse.Namespace, ops: ModuleType) -> LLM:
    # Each engine takes its kernels (linear plans, glue, attention, captured steps) from
    # the module kvflow.kernels.cpu_ops() returns while it is built.
    with mock.patch.object(kvflow.kernels, "cpu_ops", lambda: ops):
        return LLM(args.model, dtype="bfloat16", device="cpu", kv_cache_memory="256MiB",
                   quantization=args.quantization, quantize_lm_head=args.quantize_lm_head)


def same_plans(old: ModuleType, new: ModuleType) -> None:
    """The old build's measured kernel choices (which kernel, which GEMV variant per shape)
    written where the new build looks for its own: two kernels that measure alike can swap
    between two tunings, and a step on another plan is no measure of a kernel change."""
    choices = _ChoiceCache(old).path
    if choices.exists():
        target = _ChoiceCache(new).path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(choices.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new", nargs="?")
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--quantize-lm-head", action="store_true")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--own-plans", action="store_true",
                        help="let each build measure its own kernel choices, instead of the new "
                             "build taking the old one's")
    args = parser.parse_args()
    builds = {"old": load(args.old), "new": load(args.new) if args.new else kvflow.kernels.cpu_ops()}
    engines = {"old": engine(args, builds["old"])}
    if not args.own_plans:
        same_plans(builds["old"], builds["new"])
    engines["new"] = engine(args, builds["new"])
    prompt = list(range(100, 228))
    steps: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(args.rounds + 1):  # the first round warms both and is left out
        order = list(engines) if round_ % 2 else list(reversed(engines))
        for name in order:
            seconds = statistics.median(decode_steps(engines[name], prompt, args.tokens))
            if round_:
                steps[name].append(seconds)
    ratios = [old / new for old, new in zip(steps["old"], steps["new"])]
    info = inventory()
    print(f"# {info['cpu']} ({info['cpu_id']}), {torch.get_num_threads()} threads, "
          f"{args.model}, {args.quantization or 'bf16'}{'+head' if args.quantize_lm_head else ''}")
    for name, values in steps.items():
        print(f"{name}: {statistics.median(values) * 1e3:.2f} ms per decode step (median)")
    print(f"old/new: {statistics.median(ratios):.3f} (rounds: "
          f"{' '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
