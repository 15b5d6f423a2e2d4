"""Single-stream decode with the CPU's captured steps (kvflow/worker/cpu_graphs.py)
against the same engine stepping through the model's Python: one engine, its captured
graphs taken away and given back in alternating rounds, so that both see the same
weights, pages and machine state. Also the share of each step outside its kernel calls
(the replay alone is those calls, each writing into the tensor it recorded). Medians of the per-step
times of each round's decode steps.

    .venv/bin/python benchmarks/cpu_graphs.py --model PATH [--quantization int4]
        [--quantize-lm-head] [--rounds 6] [--tokens 64] [--by-kernel]

Also, in the same rounds, the captured steps replayed from C++ (the native module's
Program) against a Python loop over the same recorded calls; and with --by-kernel, each
call of a single-stream replay timed on its own, summed by kernel.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import torch

from kvflow import LLM, SamplingParams
from kvflow.bench.hardware import inventory


def decode_steps(llm: LLM, prompt: list[int], tokens: int) -> list[float]:
    """Seconds of each decode step of one request (its prefill left out)."""
    engine = llm.engine
    engine.add_request("bench", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--quantize-lm-head", action="store_true")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--by-kernel", action="store_true",
                        help="also time each call of a single-stream replay, by kernel")
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype, device="cpu", kv_cache_memory="256MiB",
              quantization=args.quantization, quantize_lm_head=args.quantize_lm_head)
    runner = llm.engine.executor.runner
    graphs = runner.graphs
    if graphs is None:
        raise SystemExit("no decode graphs were captured (see the log)")
    prompt = list(range(100, 228))
    programs = dict(graphs.graphs)
    loops = {key: python_loop(replay) for key, replay in programs.items()}
    medians: dict[str, list[float]] = {"python": [], "captured": [],
                                       "captured, Python loop": []}
    for _ in range(args.rounds):
        for mode in medians:
            runner.graphs = None if mode == "python" else graphs
            graphs.graphs = loops if mode == "captured, Python loop" else programs
            medians[mode].append(statistics.median(decode_steps(llm, prompt, args.tokens)))
    graphs.graphs = programs
    replay = graphs.graphs[1, 1]
    replays = []
    with torch.inference_mode():  # as the runner replays it
        for _ in range(30):
            start = time.perf_counter()
            replay()
            replays.append(time.perf_counter() - start)
    python, captured, looped = (statistics.median(medians[m]) for m in medians)
    replay_s = statistics.median(replays)
    info = inventory()
    print(json.dumps({
        "cpu": f"{info['cpu']} ({info['cpu_id']})", "model": args.model,
        "quantization": args.quantization, "quantize_lm_head": args.quantize_lm_head,
        "ms per decode step": {"through Python": round(python * 1e3, 2),
                               "captured": round(captured * 1e3, 2)},
        "speedup": round(python / captured, 3),
        "per-round ratios": [round(p / c, 3) for p, c in zip(medians["python"],
                                                             medians["captured"])],
        "ms per captured step replayed by a Python loop": round(looped * 1e3, 2),
        "replayed from C++ against a Python loop": round(looped / captured, 3),
        "its per-round ratios": [round(p / c, 3) for p, c in zip(
            medians["captured, Python loop"], medians["captured"])],
        "replay alone, ms": round(replay_s * 1e3, 2),
        # the replay is the step's kernels and little else:
        # what each step spends beside it
        "step through Python outside the replay": f"{100 * (1 - replay_s / python):.1f}%",
        "captured step outside the replay": f"{100 * (1 - replay_s / captured):.1f}%",
    }, indent=1))
    if args.by_kernel:
        print(by_kernel(replay.calls))


def python_loop(replay: Callable) -> Callable:
    """The replay's recorded calls, called one by one from Python."""
    calls, output = replay.calls, replay()

    def loop():
        for call in calls:
            call()
        return output

    return loop


def by_kernel(calls: list, steps: int = 30) -> str:
    """Each call of a replay timed on its own (medians over `steps` replays), by kernel."""
    name = lambda call: getattr(call.fn, "__name__", str(call.fn))  # noqa: E731
    seconds: dict[str, list[float]] = defaultdict(list)
    with torch.inference_mode():
        for _ in range(steps):
            step: dict[str, float] = defaultdict(float)
            for call in calls:
                start = time.perf_counter()
                call()
                step[name(call)] += time.perf_counter() - start
            for kernel, took in step.items():
                seconds[kernel].append(took)
    counts = Counter(name(call) for call in calls)
    total = sum(statistics.median(t) for t in seconds.values())
    lines = ["| kernel | calls | ms per step | share | us per call |",
             "| --- | --- | --- | --- | --- |"]
    for kernel, took in sorted(seconds.items(), key=lambda item: -statistics.median(item[1])):
        ms = statistics.median(took) * 1e3
        lines.append(f"| {kernel} | {counts[kernel]} | {ms:.3f} | "
                     f"{100 * ms / 1e3 / total:.1f}% | {ms * 1e3 / counts[kernel]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
