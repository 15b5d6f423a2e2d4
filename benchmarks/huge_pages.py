"""Single-stream decode with the weights gathered into one block on 2 MiB pages
(kvflow/worker/huge_pages.py) against a baseline: every tensor on 4 KiB pages
(`--baseline small-pages`), or each weight on huge pages of its own, where it spans one
(`--baseline separate`, what kvflow did before it gathered them). Both engines live in one
process and are timed in alternation (ABBA), so that the host's drift falls on both alike;
medians in tokens/s, and the median of the paired ratios.

    .venv/bin/python benchmarks/huge_pages.py --model PATH [--baseline separate]
        [--quantization int4] [--quantize-lm-head] [--rounds 16] [--tokens 64]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from kvflow import LLM, SamplingParams
from kvflow.bench.hardware import inventory
from kvflow.worker import huge_pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--quantize-lm-head", action="store_true")
    parser.add_argument("--baseline", choices=["small-pages", "separate"],
                        default="small-pages")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    def engine() -> LLM:
        return LLM(model=args.model, kv_cache_memory="1GiB", quantization=args.quantization,
                   quantize_lm_head=args.quantize_lm_head)

    engines = {"gathered on 2 MiB pages": engine()}
    if args.baseline == "small-pages":
        os.environ["KVFLOW_NO_HUGE_PAGES"] = "1"  # read as the engine loads
        engines["4 KiB pages"] = engine()
        os.environ.pop("KVFLOW_NO_HUGE_PAGES")
    else:
        gather = huge_pages.gather
        huge_pages.gather = huge_pages.advise  # each parameter's own pages, advised
        engines["each on its own huge pages"] = engine()
        huge_pages.gather = gather
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
                      "model": args.model, "baseline": args.baseline,
                      "quantization": args.quantization,
                      "quantize_lm_head": args.quantize_lm_head, "tokens_per_s": medians,
                      "paired ratio median": round(statistics.median(ratios), 2),
                      "paired ratio range": [round(min(ratios), 2), round(max(ratios), 2)]},
                     indent=1))


if __name__ == "__main__":
    main()
