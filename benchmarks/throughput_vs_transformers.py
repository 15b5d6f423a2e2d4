"""Offline throughput of kvflow's LLM.generate beside transformers' static-batched generate,
on the same requests, in one run.

    python benchmarks/throughput_vs_transformers.py --shape ../shared/model-shapes/qwen2.5-0.5b.json \
        --workload ../shared/workloads/mixed.json

Random weights in bf16 (speed only). transformers runs the requests in static batches of
--hf-batch-size, left-padded, each batch generating up to its longest output; both systems
are credited only with each request's own output_len tokens.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import BenchRequest, load_workload  # noqa: E402

TOKENIZER_CORPUS = ["def main():\n    return 0\n", "class Model:\n    pass\n"] * 50


def make_checkpoint(shape: Path, out: Path) -> Path:
    """A checkpoint of the shape's config with random bf16 weights and a small local tokenizer."""
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvflow.demo import train_tokenizer

    fields = json.loads(shape.read_text())
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    # One special token: the vocabulary size bounds the workload's prompt ids.
    train_tokenizer(TOKENIZER_CORPUS, 512, ["<|endoftext|>"]).save_pretrained(out)
    return out


def run_kvflow(path: Path, requests: list[BenchRequest], kv_cache_memory: str) -> dict:
    from kvflow import LLM, SamplingParams

    llm = LLM(str(path), dtype="bfloat16", device="cpu", kv_cache_memory=kv_cache_memory)
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate({"prompt_token_ids": requests[0].prompt_token_ids[:32]}, warm, use_tqdm=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == sum(r.output_len for r in requests)
    return {"seconds": elapsed, "generated_tokens": generated,
            "preemptions": llm.engine.scheduler.num_preemptions_total}


def run_transformers(path: Path, requests: list[BenchRequest], batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    pad = 0
    with torch.no_grad():
        model.generate(torch.tensor([requests[0].prompt_token_ids[:32]]), max_new_tokens=4,
                       do_sample=False, pad_token_id=pad)
        start = time.perf_counter()
        for first in range(0, len(requests), batch_size):
            batch = requests[first:first + batch_size]
            width = max(len(r.prompt_token_ids) for r in batch)
            ids = torch.tensor([[pad] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids
                                for r in batch])
            mask = torch.tensor([[0] * (width - len(r.prompt_token_ids))
                                 + [1] * len(r.prompt_token_ids) for r in batch])
            new = max(r.output_len for r in batch)
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad)
            print(f"transformers: batch {first // batch_size + 1} done at "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
        elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "generated_tokens": sum(r.output_len for r in requests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=Path, required=True)
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("benchmarks/results/ckpt"))
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--kv-cache-memory", default="4GiB")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = make_checkpoint(args.shape, args.checkpoint_dir / args.shape.stem)
    vocab = len(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"])
    spec, requests = load_workload(args.workload, vocab)
    results = {
        "workload": spec["name"], "shape": args.shape.stem, "num_requests": len(requests),
        "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "kvflow": run_kvflow(path, requests, args.kv_cache_memory),
        "transformers_static_batch": run_transformers(path, requests, args.hf_batch_size),
    }
    for name in ("kvflow", "transformers_static_batch"):
        r = results[name]
        r["generated_tokens_per_s"] = r["generated_tokens"] / r["seconds"]
        print(f"{name}: {r['generated_tokens']} tokens in {r['seconds']:.1f}s = "
              f"{r['generated_tokens_per_s']:.1f} generated tokens/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
