"""Train kvflow's demo model and its speculative-decoding draft from scratch on the running
Python's standard library, deterministically for a seed.

    .venv/bin/python scripts/train_demo_model.py --out kvflow/assets

writes kvflow/assets/demo/ and kvflow/assets/demo-draft/ (Hugging Face format, bf16) with a
byte-level BPE tokenizer trained on the same files, and `heldout_files.json`: the 5% of
files (chosen by a hash of their path) that no step trained on.

The shipped models (2026-11-23, 2 cores, Python 3.11.7, torch 2.13.0): 701 training
files gave 3.03M tokens; the 12.6M-parameter target trained 900 steps (7.4M tokens) in
3,171 s and the 1.4M-parameter draft 400 steps in 332 s, about 60 minutes in all.
Held-out perplexity on 20,480 tokens (scripts/eval_demo_model.py): target 81.8, draft
163.4; the draft's greedy next token equals the target's at 36.6% of positions. The shipped
draft was then distilled (2026-12-04, --distill-steps 400, 2,376 s on 2 shared cores):
perplexity 158.7, greedy agreement 38.9%.

    .venv/bin/python scripts/train_demo_model.py --out kvflow/assets --distill-steps 400
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvflow.demo import train_tokenizer

EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
HELDOUT_MODULUS = 20  # 1 file in 20 (5%) is held out
DISTILL_LR = 1e-3  # the draft is trained already: a gentler start than its first training


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    steps: int
    lr: float


TARGET = ModelSpec("demo", hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                   num_kv_heads=2, steps=900, lr=3e-3)
DRAFT = ModelSpec("demo-draft", hidden_size=128, intermediate_size=384, num_layers=2,
                  num_heads=4, num_kv_heads=2, steps=400, lr=3e-3)


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not EXCLUDED_PARTS & set(p.relative_to(root).parts)
                   and not p.name.startswith("test_"))
    return root, files


def is_heldout(relative: str) -> bool:
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:  # noqa: ANN001
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def build_model(spec: ModelSpec, vocab_size: int, max_len: int, seed: int):  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size,
                         num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                         num_key_value_heads=spec.num_kv_heads, max_position_embeddings=max_len,
                         tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def cross_entropy(vocab_size: int):  # noqa: ANN201
    def loss(model, batch: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab_size),
                                                 batch[:, 1:].reshape(-1))
    return loss


def distillation(teacher, vocab_size: int):  # noqa: ANN001, ANN201
    """KL(teacher || student) over the whole vocabulary at every position: the student
    learns the teacher's distribution, not only the text's next token, which is what
    speculative decoding's acceptance rewards."""
    def loss(model, batch: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            target = teacher(input_ids=batch[:, :-1]).logits
        target = torch.log_softmax(target.float().reshape(-1, vocab_size), dim=-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        student = torch.log_softmax(logits.float().reshape(-1, vocab_size), dim=-1)
        return torch.nn.functional.kl_div(student, target, log_target=True,
                                          reduction="batchmean")
    return loss


def train(spec: ModelSpec, model, loss_fn, tokens: np.ndarray, args: argparse.Namespace,  # noqa: ANN001
          out: Path, tokenizer, heldout: list[str], extra: dict | None = None) -> dict:  # noqa: ANN001
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    warmup = max(1, spec.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return spec.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.steps - warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = np.random.default_rng(args.seed)
    window = args.seq_len + 1
    starts_all = np.arange(0, len(tokens) - window, args.seq_len)
    order = rng.permutation(starts_all)
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(spec.steps):
        picked = order[(np.arange(args.batch_size) + step * args.batch_size) % len(order)]
        batch = torch.from_numpy(np.stack([tokens[s:s + window] for s in picked]).astype(np.int64))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == spec.steps - 1:
            elapsed = time.perf_counter() - start
            print(f"{spec.name}: step {step + 1}/{spec.steps} loss {loss.item():.3f} "
                  f"({elapsed:.0f}s, {(step + 1) * args.batch_size * args.seq_len / elapsed:.0f} "
                  "tok/s)", flush=True)
    seconds = time.perf_counter() - start
    model = model.to(torch.bfloat16).eval()
    target = out / spec.name
    model.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "heldout_files.json").write_text(json.dumps(heldout, indent=1))
    stats = {"parameters": params, "steps": spec.steps, "batch_size": args.batch_size,
             "seq_len": args.seq_len, "train_tokens_seen": spec.steps * args.batch_size
             * args.seq_len, "train_seconds": round(seconds), "final_loss": losses[-1],
             "mean_loss_last_20": float(np.mean(losses[-20:])), "seed": args.seed,
             "python": platform.python_version(), "torch": torch.__version__, **(extra or {})}
    (target / "training.json").write_text(json.dumps(stats, indent=1))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("kvflow/assets"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["demo", "demo-draft"], default=None)
    parser.add_argument("--steps", type=int, default=None, help="override both models' steps")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="instead of training, go on training the draft in --out this many "
                             "steps against the logits of the target in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root, files = stdlib_files()
    relative = [str(p.relative_to(root)) for p in files]
    train_files = [p for p, r in zip(files, relative) if not is_heldout(r)]
    heldout = [r for r in relative if is_heldout(r)]
    texts = [read(p) for p in train_files]
    print(f"{len(train_files)} training files, {len(heldout)} held out", flush=True)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    tokens = token_stream(tokenizer, texts)
    print(f"{len(tokens)} training tokens", flush=True)
    vocab_size = len(tokenizer)
    if args.distill_steps:
        distill_draft(args, tokens, vocab_size, tokenizer, heldout)
        return
    for spec in (TARGET, DRAFT):
        if args.only and spec.name != args.only:
            continue
        if args.steps:
            spec = ModelSpec(**{**spec.__dict__, "steps": args.steps})
        model = build_model(spec, vocab_size, args.max_len, args.seed)
        print(json.dumps(train(spec, model, cross_entropy(vocab_size), tokens, args, args.out,
                               tokenizer, heldout)), flush=True)


def distill_draft(args: argparse.Namespace, tokens: np.ndarray, vocab_size: int, tokenizer,  # noqa: ANN001
                  heldout: list[str]) -> None:
    """Go on training the shipped draft against the shipped target's distribution."""
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM.from_pretrained(args.out / TARGET.name).eval()
    draft = LlamaForCausalLM.from_pretrained(args.out / DRAFT.name, dtype=torch.float32)
    before = json.loads((args.out / DRAFT.name / "training.json").read_text())
    spec = ModelSpec(**{**DRAFT.__dict__, "steps": args.distill_steps,
                        "lr": DISTILL_LR})
    extra = {"cross_entropy_steps": before["steps"],
             "cross_entropy_train_seconds": before["train_seconds"],
             "distilled_from": TARGET.name, "distill_lr": DISTILL_LR}
    print(json.dumps(train(spec, draft, distillation(teacher, vocab_size), tokens, args,
                           args.out, tokenizer, heldout, extra)), flush=True)


if __name__ == "__main__":
    main()
