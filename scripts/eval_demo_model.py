"""Measure the shipped demo models: held-out perplexity of each, how often the draft's
greedy next token equals the target's on held-out text (what bounds speculative decoding's
gain on greedy requests), the chance that a draft is accepted at temperature 0.8 when the
draft proposes its argmax, p(argmax q), and when it samples from q, sum(min(p, q)), and
greedy completions of two prompts.

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
    report["draft_acceptance_at_temperature_0.8"] = sampled_acceptance(
        args.models, ids[:4096], 0.8)
    print(json.dumps(report, indent=1))


def sampled_acceptance(models: Path, ids: list[int], temperature: float) -> dict[str, float]:
    """Mean chance, over held-out positions, that one draft is accepted: proposing the
    draft's argmax (accepted with p(x)) or sampling from the draft's q (min(1, p/q))."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        batch = torch.tensor([ids[i:i + 1024] for i in range(0, len(ids) - 1023, 1024)])
        p, q = (torch.softmax(LlamaForCausalLM.from_pretrained(models / name, dtype=torch.float32)
                              (batch).logits / temperature, dim=-1)
                for name in ("demo", "demo-draft"))
        return {"argmax_draft": round(p.gather(-1, q.argmax(-1, keepdim=True)).mean().item(), 4),
                "sampled_draft": round(torch.minimum(p, q).sum(-1).mean().item(), 4)}


if __name__ == "__main__":
    main()
