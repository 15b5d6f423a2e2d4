"""The demo models that ship with kvflow, and what builds and checks them.

`kvflow/assets/demo` (12.6M parameters) and `kvflow/assets/demo-draft` (1.4M, its
speculative-decoding draft) are Llama-architecture models trained from scratch on the
Python standard library's own source by scripts/train_demo_model.py, with a byte-level BPE
tokenizer trained on the same files. They are the default model wherever no model is given,
so that kvflow does real work offline. `heldout_files.json` beside each lists the standard
library files (relative paths) that no training step saw.
"""
from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL_NAME = "kvflow-demo"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def demo_model_path() -> Path:
    return ASSETS / "demo"


def demo_draft_path() -> Path:
    return ASSETS / "demo-draft"


def heldout_texts(model: Path | None = None) -> list[str]:
    """The held-out standard library files that exist in the running Python, in the
    shipped order; another Python version may lack some."""
    listed = json.loads(((model or demo_model_path()) / "heldout_files.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / name).read_text(encoding="utf-8", errors="replace")
            for name in listed if (root / name).is_file()]


def heldout_token_ids(tokenizer, limit: int, model: Path | None = None) -> list[int]:  # noqa: ANN001
    """The first `limit` tokens of the held-out files, each file followed by EOS, as in
    training."""
    ids: list[int] = []
    for text in heldout_texts(model):
        ids += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        if len(ids) >= limit:
            break
    return ids[:limit]


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


def score_heldout(llm, token_ids: list[int], chunk_len: int = 1024) -> tuple[float, list[int]]:  # noqa: ANN001
    """Perplexity of `token_ids` under the model, scored in independent chunks through
    prompt_logprobs, and the model's greedy next token at every scored position."""
    from kvflow import SamplingParams

    chunks = [token_ids[i:i + chunk_len] for i in range(0, len(token_ids), chunk_len)]
    chunks = [c for c in chunks if len(c) > 1]
    outputs = llm.generate([{"prompt_token_ids": c} for c in chunks],
                           SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    nll, greedy = 0.0, []
    for output, chunk in zip(outputs, chunks):
        for position, token in zip(output.prompt_logprobs[1:], chunk[1:]):
            nll -= position[token].logprob
            greedy.append(next(t for t, lp in position.items() if lp.rank == 1))
    return math.exp(nll / len(greedy)), greedy
