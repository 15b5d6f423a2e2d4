"""Single-stream decode with the CPU's captured steps (kvflow/worker/cpu_graphs.py)
against the same engine stepping through the model's Python: one engine, its captured
graphs taken away and given back in alternating rounds, so that both see the same
weights, pages and machine state. Also the share of each step outside its kernel calls
(the replay alone is those calls, each writing into the tensor it recorded). Medians of the per-step
times of each round's decode steps.

    .venv/bin/python benchmarks/cpu_graphs.py --model PATH [--quantization int4]
        [--quantize-lm-head] [--rounds 6] [--tokens 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

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
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype, device="cpu", kv_cache_memory="256MiB",
              quantization=args.quantization, quantize_lm_head=args.quantize_lm_head)
    runner = llm.engine.executor.runner
    graphs = runner.graphs
    if graphs is None:
        raise SystemExit("no decode graphs were captured (see the log)")
    prompt = list(range(100, 228))
    medians: dict[str, list[float]] = {"python": [], "captured": []}
    for _ in range(args.rounds):
        for mode in medians:
            runner.graphs = graphs if mode == "captured" else None
            medians[mode].append(statistics.median(decode_steps(llm, prompt, args.tokens)))
    replay = graphs.graphs[1, 1]
    replays = []
    with torch.inference_mode():  # as the runner replays it
        for _ in range(30):
            start = time.perf_counter()
            replay()
            replays.append(time.perf_counter() - start)
    python, captured = (statistics.median(medians[m]) for m in ("python", "captured"))
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
        "replay alone, ms": round(replay_s * 1e3, 2),
        # the replay is the step's kernels and little else:
        # what each step spends beside it
        "step through Python outside the replay": f"{100 * (1 - replay_s / python):.1f}%",
        "captured step outside the replay": f"{100 * (1 - replay_s / captured):.1f}%",
    }, indent=1))


if __name__ == "__main__":
    main()
