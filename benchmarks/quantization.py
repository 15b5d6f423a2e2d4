"""Weight-only quantization measured in one run (issue 10): single-stream decode tokens/s
and resident weight bytes of one model in its own dtype, int8 and int4, each also with the
LM head in int8 (`--quantize-lm-head`; the formats' engines are loaded side by side and
timed in alternating rounds, medians reported, so that other load on the machine falls on
all of them alike), and the demo model's accuracy in
each format and as GGUF files (Q8_0, Q4_0, Q4_K_M, written by kvflow/bench/gguf_export.py
as llama-quantize lays them out): held-out perplexity through prompt_logprobs, and the
mean KL divergence from bf16 of the next-token distributions behind them, every layer
through the kernel that decodes (a single stream's).

    .venv/bin/python benchmarks/quantization.py [--model DIR] [--rounds 7]
                                                [--accuracy-only | --speed-only]

The engines run where the default device is (CUDA when there is one).

Without --model, the qwen2.5-0.5b shape with random bf16 weights is made (once) under
kvflow's cache (`kvflow bench make-model qwen2.5-0.5b DIR`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from kvflow import LLM, SamplingParams
from kvflow.bench.compare import KVFLOW_QUANTIZATIONS as FORMATS
from kvflow.bench.gguf_export import export_gguf
from kvflow.bench.hardware import cpuinfo
from kvflow.cache import cache_root
from kvflow.demo import demo_model_path, heldout_token_ids
from kvflow.quantization.base import QuantizedLinearMethod, QuantizedPlan

GGUF_RECIPES = ("Q8_0", "Q4_0", "Q4_K_M")


def _weight_bytes(llm: LLM) -> dict[str, int]:
    """Parameters, and the second copies of weights that tuning made for the kernels that
    read their own layout."""
    model = llm.engine.runner.model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    plans = [m.plan for m in model.modules() if getattr(m, "plan", None) is not None]
    plans += [model.lm_head_plan] if model.lm_head_plan is not None else []
    copies = sum(t.numel() * t.element_size() for plan in plans
                 for t in (getattr(plan, "packed_weight", None),
                           getattr(plan, "float32_weight", None),
                           *getattr(plan, "weights", ())) if t is not None)
    return {"parameters": params, "large_batch_copies": copies}


def _kernels(llm: LLM) -> list[str]:
    """The quantized kernels tuning chose: "small up to N rows, large above"."""
    plans = [m.plan for m in llm.engine.runner.model.modules()
             if isinstance(getattr(m, "plan", None), QuantizedPlan)]
    return sorted({f"{p.small} up to {p.small_max_rows} rows, {p.large} above" for p in plans})


def _decode_tokens_per_second(llm: LLM, prompt: list[int], output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    metrics = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].metrics
    return (output_len - 1) / (metrics.finished_time - metrics.first_token_time)


def speed(model: Path, rounds: int, prompt_len: int, output_len: int) -> dict:
    llms = {name: LLM(str(model), kv_cache_memory="256MiB", **options)
            for name, options in FORMATS.items()}
    prompt = torch.randint(5, 4000, (prompt_len,), generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {name: [] for name in llms}
    for round_ in range(rounds + 1):  # the first round warms up
        for name, llm in llms.items():
            rate = _decode_tokens_per_second(llm, prompt.tolist(), output_len)
            if round_:
                rates[name].append(rate)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {name: {"decode_tokens_per_s": round(medians[name], 2),
                   "kernels": _kernels(llms[name]),
                   "vs_bf16": round(medians[name] / medians["bf16"], 3),
                   "rounds": [round(r, 2) for r in rates[name]],
                   "weight_bytes": _weight_bytes(llms[name])} for name in llms}


def _capture_prompt_logprobs(llm: LLM) -> list[torch.Tensor]:
    """A list that collects the log-softmax of every multi-row compute_logits call: with
    one prompt per step, the rows prompt_logprobs are read from (position p scores p + 1).
    A head in another format (--quantize-lm-head) computes every row itself, as it does a
    decode step's few (a tied one hands a prompt's many rows to the embedding), so that
    the accuracy measured is the one decoding gets."""
    model = llm.engine.runner.model
    head = model.lm_head
    compute = (head if head is not None and isinstance(head.method, QuantizedLinearMethod)
               else model.compute_logits)
    captured: list[torch.Tensor] = []

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        logits = compute(hidden)
        if logits.shape[0] > 1:
            captured.append(torch.log_softmax(logits.float(), dim=-1))
        return logits

    model.compute_logits = capture
    return captured


def _decode_kernels_for_every_batch(llm: LLM) -> None:
    """Every quantized layer runs the kernel its plan chose for decode batches on all
    batches, prompts included: each row's product is the same whatever the batch (the
    int8-activation kernels quantize x row by row), so the perplexity measured is the one
    decoding gets, not the large-batch kernel's."""
    for module in llm.engine.runner.model.modules():
        plan = getattr(module, "plan", None)
        if isinstance(plan, QuantizedPlan):
            module.plan = dataclasses.replace(plan, small_max_rows=sys.maxsize)


def accuracy(tokens: int, chunk_len: int = 1024) -> dict:
    """Perplexity of the held-out tokens in each format (chunks scored independently), and
    the mean over scored positions of KL(bf16 || format)."""
    demo = demo_model_path()
    workdir = Path(tempfile.mkdtemp(prefix="kvflow-gguf-"))
    models = {name: (str(demo), options) for name, options in FORMATS.items()}
    models.update({f"GGUF {r}": (str(export_gguf(demo, workdir / f"demo-{r}.gguf", r)), {})
                   for r in GGUF_RECIPES})
    llms = {name: LLM(path, kv_cache_memory="256MiB", **options)
            for name, (path, options) in models.items()}
    ids = heldout_token_ids(llms["bf16"].get_tokenizer(), tokens, demo)
    chunks = [c for c in (ids[i:i + chunk_len] for i in range(0, len(ids), chunk_len))
              if len(c) > 1]
    kernels = {name: _kernels(llm) for name, llm in llms.items()}
    for llm in llms.values():
        _decode_kernels_for_every_batch(llm)
    captured = {name: _capture_prompt_logprobs(llm) for name, llm in llms.items()}
    nll = dict.fromkeys(llms, 0.0)
    kl = dict.fromkeys(llms, 0.0)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    for chunk in chunks:
        for name, llm in llms.items():
            captured[name].clear()
            output = llm.generate([{"prompt_token_ids": chunk}], params, use_tqdm=False)[0]
            nll[name] -= sum(p[t].logprob for p, t in zip(output.prompt_logprobs[1:], chunk[1:]))
        reference = captured["bf16"][0]
        for name in llms:
            logprobs = captured[name][0]
            kl[name] += float((reference.exp() * (reference - logprobs)).sum())
    scored = sum(len(c) - 1 for c in chunks)
    result = {name: math.exp(nll[name] / scored) for name in llms}
    return {name: {"perplexity": round(p, 3), "vs_bf16": round(p / result["bf16"] - 1, 5),
                   "mean_kl_from_bf16": round(kl[name] / scored, 6),
                   "kernels": kernels[name]}
            for name, p in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=20480, help="held-out tokens scored")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--accuracy-only", action="store_true",
                      help="only the demo model's perplexity and KL divergence")
    only.add_argument("--speed-only", action="store_true", help="only the decode speeds")
    args = parser.parse_args()
    report = {"cpu": cpuinfo().get("model name"), "threads": torch.get_num_threads(),
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if args.accuracy_only:
        print(json.dumps({**report, "demo_accuracy": accuracy(args.tokens)}, indent=1))
        return
    model = args.model
    if model is None:
        from kvflow.bench.make_model import make_model

        model = cache_root() / "bench-models" / "qwen2.5-0.5b"
        if not model.exists():
            make_model("qwen2.5-0.5b", model)
    report.update({"model": str(model), "speed": speed(model, args.rounds, args.prompt_len,
                                                       args.output_len)})
    if not args.speed_only:
        report["demo_accuracy"] = accuracy(args.tokens)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
