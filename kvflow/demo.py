"""The default model until a trained demo model ships: a small Llama-architecture checkpoint
with seeded random weights and a byte-level BPE tokenizer trained on the running Python's
standard library, built on first use and cached. Its text is gibberish; it exists so that
`kvflow serve` and `kvflow generate` work with no model and no network.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

DEMO_VERSION = "random-v1"
VOCAB_SIZE = 4096
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    "vocab_size": VOCAB_SIZE, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32",
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_FILES = 40


def cache_root() -> Path:
    """Where kvflow keeps what it builds or measures: $KVFLOW_CACHE or ~/.cache/kvflow."""
    return Path(os.environ.get("KVFLOW_CACHE") or Path.home() / ".cache" / "kvflow")


def cache_dir() -> Path:
    return cache_root() / f"demo-{DEMO_VERSION}"


def ensure_demo_model(directory: Path | None = None) -> Path:
    """The cached demo checkpoint, built (atomically) if absent."""
    target = directory or cache_dir()
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        _write_tokenizer(staging)
        _write_model(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _training_text() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:TRAINING_FILES]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int,
                    special_tokens: list[str] = SPECIAL_TOKENS,
                    chat_template: str = CHAT_TEMPLATE):  # noqa: ANN201
    """A byte-level BPE tokenizer with a chat template, as a transformers fast tokenizer.
    The first special token is EOS and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=special_tokens[0],
                                   pad_token=special_tokens[0])
    fast.chat_template = chat_template
    return fast


def _write_tokenizer(out: Path) -> None:
    train_tokenizer(_training_text(), VOCAB_SIZE).save_pretrained(out)


def _write_model(out: Path) -> None:
    c = CONFIG
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = hidden // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    generator = torch.Generator().manual_seed(0)

    def weight(rows: int, cols: int) -> torch.Tensor:
        # std 2/sqrt(fan_in) so that greedy decoding does not repeat one token forever
        return torch.randn(rows, cols, generator=generator) * (2.0 / math.sqrt(cols))

    tensors = {"model.embed_tokens.weight": weight(VOCAB_SIZE, hidden),
               "model.norm.weight": torch.ones(hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": weight(hidden, hidden),
            p + "self_attn.k_proj.weight": weight(kv, hidden),
            p + "self_attn.v_proj.weight": weight(kv, hidden),
            p + "self_attn.o_proj.weight": weight(hidden, hidden),
            p + "mlp.gate_proj.weight": weight(inter, hidden),
            p + "mlp.up_proj.weight": weight(inter, hidden),
            p + "mlp.down_proj.weight": weight(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        })
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
