"""Measure the shipped demo models: held-out perplexity of each, how often the draft's
greedy next token equals the target's on held-out text (what bounds speculative decoding's
gain), and greedy completions of two prompts.

    .venv/bin/python scripts/eval_demo_model.py [--models kvflow/assets] [--tokens 20480]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvflow import LLM, SamplingParams
from kvflow.demo import ASSETS, heldout_token_ids, score_heldout

PROMPTS = ["def fibonacci(n):", "class Stack:"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ASSETS)
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    report: dict = {}
    greedy = {}
    for name in ("demo", "demo-draft"):
        llm = LLM(str(args.models / name), kv_cache_memory="256MiB",
                  max_num_batched_tokens=2048)
        ids = heldout_token_ids(llm.get_tokenizer(), args.tokens, args.models / name)
        start = time.perf_counter()
        perplexity, greedy[name] = score_heldout(llm, ids)
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        samples = {p: llm.generate(p, params, use_tqdm=False)[0].outputs[0].text
                   for p in PROMPTS}
        report[name] = {"heldout_perplexity": round(perplexity, 2), "heldout_tokens": len(ids),
                        "scoring_seconds": round(time.perf_counter() - start, 1),
                        "samples": samples}
    agree = sum(a == b for a, b in zip(greedy["demo"], greedy["demo-draft"]))
    report["draft_greedy_agreement"] = round(agree / len(greedy["demo"]), 4)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
