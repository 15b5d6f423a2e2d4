"""`kvflow bench make-model`: a checkpoint of a given shape with random bf16 weights and a
locally trained tokenizer, so that benchmarks need no download. Random weights time a
model's cost faithfully and say nothing about its output."""
from __future__ import annotations

import json
import shutil
import sysconfig
import tempfile
from pathlib import Path

import torch

from kvflow.bench.workload import resolve_named

TOKENIZER_VOCAB = 4096
TOKENIZER_FILES = 40


def _tokenizer_corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [f.read_text(encoding="utf-8", errors="replace")
            for f in sorted(stdlib.glob("*.py"))[:TOKENIZER_FILES]]


def make_model(shape: str | Path, out: Path, seed: int = 0) -> Path:
    """Write the checkpoint to `out` (atomically); the tokenizer may be smaller than the
    model's vocabulary, and workloads draw prompt ids from the tokenizer's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvflow.demo import train_tokenizer

    fields = json.loads(resolve_named(shape, "model-shapes").read_text())
    if "model_type" not in fields:
        raise ValueError(f"{shape}: a shape needs a 'model_type' field")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer = train_tokenizer(_tokenizer_corpus(), min(TOKENIZER_VOCAB, config.vocab_size))
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def tokenizer_vocab_size(model: str | Path) -> int:
    """Prompt ids are drawn below the tokenizer's vocabulary, not the model's."""
    from kvflow.models.loader import resolve_model_path
    from kvflow.tokenizer.loader import load_tokenizer

    # Resolved first, so that a mistyped path gets kvflow's error, not the Hub's; loaded
    # as the engine loads it, so that a GGUF file's tokenizer is its metadata's.
    return len(load_tokenizer(resolve_model_path(str(model))))
