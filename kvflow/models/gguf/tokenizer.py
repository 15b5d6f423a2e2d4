"""A GGUF file's tokenizer and chat template, built by transformers
(`AutoTokenizer.from_pretrained(directory, gguf_file=name)`), which turns llama.cpp's
vocabulary, merges, token types and pre-tokenizer name back into a fast tokenizer and
reads `tokenizer.chat_template`.

AutoTokenizer reads the file's model config only to choose a tokenizer class, and refuses
an architecture whose config transformers cannot read from GGUF (llama.cpp's olmoe). The
vocabulary needs no config: for such a file the generic fast tokenizer is built from the
same metadata by the same conversion."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kvflow.models.gguf.header import check_header

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    check_header(path)  # transformers reads the file with the gguf package's reader too
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for a vocabulary it cannot build
        error = exc
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception:  # AutoTokenizer's error says more: it read the file first
        raise ValueError(f"could not build a tokenizer from {path.name}'s GGUF metadata "
                         f"({type(error).__name__}: {error}); pass --tokenizer with a "
                         "directory that holds the model's tokenizer.json") from error
