"""Weight-only quantization measured in one run (issue 10): single-stream decode tokens/s
and resident weight bytes of one model in its own dtype, int8 and int4 (the formats'
engines are loaded side by side and timed in alternating rounds, medians reported, so that
other load on the machine falls on all of them alike), and the demo model's held-out
perplexity in each format through prompt_logprobs.

    .venv/bin/python benchmarks/quantization.py [--model DIR] [--rounds 7]

Without --model, the qwen2.5-0.5b shape with random bf16 weights is made (once) under
kvflow's cache (`kvflow bench make-model qwen2.5-0.5b DIR`)."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from kvflow import LLM, SamplingParams
from kvflow.bench.hardware import cpuinfo
from kvflow.demo import cache_root, demo_model_path, heldout_token_ids, score_heldout

FORMATS = {"bf16": None, "int8": "int8", "int4": "int4"}


def _weight_bytes(llm: LLM) -> dict[str, int]:
    """Parameters, and the second copies of weights that tuning made for large batches."""
    model = llm.engine.runner.model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    plans = [m.plan for m in model.modules() if getattr(m, "plan", None) is not None]
    plans += [model.lm_head_plan] if model.lm_head_plan is not None else []
    copies = sum(t.numel() * t.element_size() for plan in plans
                 for t in (getattr(plan, "packed_weight", None),
                           getattr(plan, "float32_weight", None)) if t is not None)
    return {"parameters": params, "large_batch_copies": copies}


def _decode_tokens_per_second(llm: LLM, prompt: list[int], output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    metrics = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].metrics
    return (output_len - 1) / (metrics.finished_time - metrics.first_token_time)


def speed(model: Path, rounds: int, prompt_len: int, output_len: int) -> dict:
    llms = {name: LLM(str(model), quantization=q, kv_cache_memory="256MiB")
            for name, q in FORMATS.items()}
    prompt = torch.randint(5, 4000, (prompt_len,), generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {name: [] for name in llms}
    for round_ in range(rounds + 1):  # the first round warms up
        for name, llm in llms.items():
            rate = _decode_tokens_per_second(llm, prompt.tolist(), output_len)
            if round_:
                rates[name].append(rate)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {name: {"decode_tokens_per_s": round(medians[name], 2),
                   "vs_bf16": round(medians[name] / medians["bf16"], 3),
                   "rounds": [round(r, 2) for r in rates[name]],
                   "weight_bytes": _weight_bytes(llms[name])} for name in llms}


def perplexity(tokens: int) -> dict:
    result = {}
    for name, q in FORMATS.items():
        llm = LLM(str(demo_model_path()), quantization=q, kv_cache_memory="256MiB")
        ids = heldout_token_ids(llm.get_tokenizer(), tokens, demo_model_path())
        result[name] = round(score_heldout(llm, ids)[0], 3)
    return {name: {"perplexity": p, "vs_bf16": round(p / result["bf16"] - 1, 5)}
            for name, p in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=20480, help="held-out tokens scored")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from kvflow.bench.make_model import make_model

        model = cache_root() / "bench-models" / "qwen2.5-0.5b"
        if not model.exists():
            make_model("qwen2.5-0.5b", model)
    report = {"cpu": cpuinfo().get("model name"), "threads": torch.get_num_threads(),
              "model": str(model), "speed": speed(model, args.rounds, args.prompt_len,
                                                  args.output_len),
              "demo_perplexity": perplexity(args.tokens)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
