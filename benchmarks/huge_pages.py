"""Single-stream decode with the weights and KV cache on 2 MiB pages against 4 KiB ones
(kvflow/worker/huge_pages.py), both engines in one process and timed in alternation, so
that the host's drift falls on both alike; medians in tokens/s.

    .venv/bin/python benchmarks/huge_pages.py --model PATH [--quantization int4]
        [--quantize-lm-head] [--rounds 10] [--tokens 64]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from kvflow import LLM, SamplingParams
from kvflow.bench.hardware import inventory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--quantize-lm-head", action="store_true")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    engines = {}
    for name, off in (("2 MiB pages", ""), ("4 KiB pages", "1")):
        os.environ["KVFLOW_NO_HUGE_PAGES"] = off  # read as each engine loads
        engines[name] = LLM(model=args.model, kv_cache_memory="1GiB",
                            quantization=args.quantization,
                            quantize_lm_head=args.quantize_lm_head)
    os.environ.pop("KVFLOW_NO_HUGE_PAGES")
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0)
    prompt = [{"prompt_token_ids": list(range(1, 33))}]
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(args.rounds + 1):  # the first round warms up
        # ABBA: neither engine always runs first.
        for name, llm in (engines.items() if round_ % 2 else reversed(engines.items())):
            start = time.perf_counter()
            llm.generate(prompt, params, use_tqdm=False)
            if round_:
                rates[name].append(args.tokens / (time.perf_counter() - start))
    info = inventory()
    medians = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    ratios = [a / b for a, b in zip(*rates.values())]
    print(json.dumps({"cpu": f"{info['cpu']} ({info['cpu_id']})", "threads": info["torch_threads"],
                      "model": args.model, "quantization": args.quantization,
                      "quantize_lm_head": args.quantize_lm_head, "tokens_per_s": medians,
                      "paired ratio median": round(statistics.median(ratios), 2),
                      "paired ratio range": [round(min(ratios), 2), round(max(ratios), 2)]},
                     indent=1))


if __name__ == "__main__":
    main()
