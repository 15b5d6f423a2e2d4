"""Speculative decoding measured in one run (issue 13): single-stream decode tokens/s and
acceptance (mean accepted drafts per verification, and per draft position) with speculation
off, the ngram proposer and the demo draft model, on the demo model, greedy and sampled;
then decode throughput at several batch sizes with speculation never switched off, which
is what disable_by_batch_size's default rests on.

Prompts are windows of the held-out standard-library files (text no training step saw);
each configuration continues every prompt alone, one request at a time. The engines are
loaded side by side and timed in alternating rounds, and medians are reported, so that
other load on the machine falls on all of them alike.

    .venv/bin/python benchmarks/spec_decode.py [--rounds 3] [--prompts 8] [--k 2 3 4]
        [--batch-sizes 1 2 4 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvflow import LLM, SamplingParams
from kvflow.bench.hardware import inventory
from kvflow.demo import demo_draft_path, demo_model_path, heldout_token_ids
from kvflow.engine.stats import SpecDecodeStats


def configs(ks: list[int], ngram_k: int) -> dict[str, dict | None]:
    """Speculation is never switched off here (no batch-size limit, no acceptance floor),
    so that what it costs shows wherever it does not pay."""
    always = {"disable_by_batch_size": None, "min_acceptance_rate": 0.0}
    found: dict[str, dict | None] = {"off": None}
    found[f"ngram k={ngram_k}"] = {"method": "ngram", "num_speculative_tokens": ngram_k,
                                   "prompt_lookup_min": 2, "prompt_lookup_max": 5, **always}
    for k in ks:
        found[f"draft k={k}"] = {"model": str(demo_draft_path()), "num_speculative_tokens": k,
                                 **always}
    return found


def _spec_stats(llm: LLM) -> SpecDecodeStats:
    return llm.llm_engine.stats.spec_decode or SpecDecodeStats()


def _run(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, list[int]]:
    output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    metrics = output.metrics
    tokens = output.outputs[0].token_ids
    return (len(tokens) - 1) / (metrics.finished_time - metrics.first_token_time), tokens


def measure(llms: dict[str, LLM], prompts: list[list[int]], params: SamplingParams,
            rounds: int) -> dict[str, dict]:
    rates: dict[str, list[float]] = {name: [] for name in llms}
    tokens: dict[str, list[list[int]]] = {name: [] for name in llms}
    before = {name: _spec_stats(llm) for name, llm in llms.items()}
    for round_ in range(rounds):
        for prompt in prompts:
            for name, llm in llms.items():
                rate, out = _run(llm, prompt, params)
                rates[name].append(rate)
                if round_ == 0:
                    tokens[name].append(out)
    report = {}
    base = statistics.median(rates["off"])
    for name, llm in llms.items():
        after, start = _spec_stats(llm), before[name]
        drafts = after.num_drafts - start.num_drafts
        per_pos = [a - (start.num_accepted_tokens_per_pos[i]
                        if i < len(start.num_accepted_tokens_per_pos) else 0)
                   for i, a in enumerate(after.num_accepted_tokens_per_pos)]
        accepted = after.num_accepted_tokens - start.num_accepted_tokens
        drafted = after.num_draft_tokens - start.num_draft_tokens
        median = statistics.median(rates[name])
        report[name] = {
            "decode_tokens_per_s": round(median, 1), "vs_off": round(median / base, 3),
            "verifications": drafts,
            "mean_accepted_per_verification": round(accepted / drafts, 3) if drafts else None,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
            "accepted_rate_per_position": [round(a / drafts, 3) for a in per_pos]
            if drafts else [],
        }
        if params.temperature == 0:
            report[name]["same_tokens_as_off"] = tokens[name] == tokens["off"]
    return report


def batch_throughput(llms: dict[str, LLM], prompts: list[list[int]], batch_size: int,
                     output_len: int, rounds: int) -> dict[str, dict]:
    """Output tokens/s of batch_size greedy requests at once (prompts reused round-robin)."""
    batch = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(batch_size)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    rates: dict[str, list[float]] = {name: [] for name in llms}
    for _ in range(rounds):
        for name, llm in llms.items():
            start = time.perf_counter()
            llm.generate(batch, params, use_tqdm=False)
            rates[name].append(batch_size * output_len / (time.perf_counter() - start))
    base = statistics.median(rates["off"])
    return {name: {"tokens_per_s": round(statistics.median(r), 1),
                   "vs_off": round(statistics.median(r) / base, 3)} for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--ngram-k", type=int, default=4)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--num-threads", type=int, default=None,
                        help="CPU threads per engine (default: kvflow's choice)")
    args = parser.parse_args()
    llms = {name: LLM(str(demo_model_path()), kv_cache_memory="256MiB",
                      speculative_config=config, num_threads=args.num_threads)
            for name, config in configs(args.k, args.ngram_k).items()}
    ids = heldout_token_ids(llms["off"].get_tokenizer(), 40 * args.prompt_len)
    stride = len(ids) // args.prompts
    prompts = [ids[i * stride:i * stride + args.prompt_len] for i in range(args.prompts)]
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for llm in llms.values():
        _run(llm, prompts[0], warm)
    machine = inventory()
    report: dict = {"cpu": machine["cpu"], "isa": [f for f, has in machine["isa"].items() if has],
                    "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                    "prompts": args.prompts, "prompt_len": args.prompt_len,
                    "output_len": args.output_len, "rounds": args.rounds}
    for temperature in args.temperatures:
        params = SamplingParams(temperature=temperature, max_tokens=args.output_len,
                                ignore_eos=True, seed=0 if temperature else None)
        report[f"temperature={temperature}"] = measure(llms, prompts, params, args.rounds)
        print(json.dumps(report, indent=1), flush=True)
    for batch_size in args.batch_sizes:
        report[f"batch={batch_size}"] = batch_throughput(llms, prompts, batch_size,
                                                         args.output_len, args.rounds)
        print(json.dumps({f"batch={batch_size}": report[f"batch={batch_size}"]}), flush=True)
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
