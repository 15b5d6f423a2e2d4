"""The tokenizer of a checkpoint directory or GGUF file.

AutoTokenizer picks a tokenizer class from the checkpoint's files, and importing what it
picks from (transformers' model packages) costs about 0.4 s of every start. Where it picks
one of the generic classes that transformers exports at its top level, the choice is kept
in kvflow's cache, keyed by the files it was made from and transformers' version, and later
starts load that class directly. Other choices (a family's own tokenizer class) go through
AutoTokenizer every time.

A GGUF file's tokenizer is built by transformers from the file's vocabulary and merges:
seconds for a 49,152-token vocabulary. A generic one is saved in the cache, keyed by the
file's path, size and modification time, and loaded from there by later starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from kvflow.cache import cache_root, write_atomically
from kvflow.models.gguf import is_gguf

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Classes AutoTokenizer may return that `transformers` itself exports (no model package).
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# The files AutoTokenizer's choice depends on.
_CHOICE_FILES = ("tokenizer_config.json", "config.json", "tokenizer.json")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    if is_gguf(path):
        tokenizer = _load_gguf_tokenizer(Path(path))
    else:
        try:
            tokenizer = _load_checkpoint_tokenizer(Path(path))
        except Exception as exc:
            raise ValueError(f"could not load a tokenizer from {path}: {exc}") from exc
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"the tokenizer in {path} has no fast (tokenizers) backend, "
                         "which kvflow's incremental detokenizer needs")
    return tokenizer


def _choice_path(path: Path) -> Path:
    import transformers

    digest = hashlib.sha256(transformers.__version__.encode())
    for name in _CHOICE_FILES:
        file = path / name
        digest.update(name.encode() + (file.read_bytes() if file.is_file() else b"\0"))
    return cache_root() / "tokenizers" / f"{digest.hexdigest()[:24]}.json"


def _load_checkpoint_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    import transformers

    choice = _choice_path(path)
    if choice.exists():
        name = json.loads(choice.read_text()).get("class")
        if name in GENERIC_CLASSES:
            return getattr(transformers, name).from_pretrained(str(path))
        logger.warning("ignoring %s (names %r)", choice, name)
    from transformers import AutoTokenizer

    from kvflow.models.hf_config import load_hf_config

    # The resolved config spares AutoTokenizer resolving it again.
    config = load_hf_config(path) if (path / "config.json").is_file() else None
    tokenizer = AutoTokenizer.from_pretrained(str(path), config=config)
    if type(tokenizer).__name__ in GENERIC_CLASSES:
        try:
            write_atomically(choice, json.dumps({"class": type(tokenizer).__name__}))
        except OSError as exc:
            logger.warning("could not keep the tokenizer choice in %s: %s", choice, exc)
    return tokenizer


def _load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    import transformers

    from kvflow.models.gguf.tokenizer import load_gguf_tokenizer

    stat = path.resolve().stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    saved = cache_root() / "tokenizers" / f"gguf-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
    choice = saved / "kvflow-class.json"
    if choice.exists():
        name = json.loads(choice.read_text()).get("class")
        if name in GENERIC_CLASSES:
            return getattr(transformers, name).from_pretrained(str(saved))
        logger.warning("ignoring %s (names %r)", choice, name)
    tokenizer = load_gguf_tokenizer(path)
    if type(tokenizer).__name__ in GENERIC_CLASSES:
        try:
            tokenizer.save_pretrained(str(saved))
            # written last: a folder without it is an interrupted save, made again
            write_atomically(choice, json.dumps({"class": type(tokenizer).__name__}))
        except OSError as exc:
            logger.warning("could not keep the tokenizer of %s in %s: %s", path.name, saved, exc)
    return tokenizer
