"""A checkpoint's transformers config, resolved once per machine.

transformers fills the fields a config.json leaves out with the defaults of the family's
config class, and importing that class (LlamaConfig, Qwen2Config, ...) imports much of
transformers' modeling stack with it: about a second, a third of a restart. AutoTokenizer
reads the same config. So the resolved fields are kept in kvflow's cache, keyed by the
config.json's bytes and transformers' version, and later starts rebuild the config from
them as a plain PreTrainedConfig that answers every attribute the class would, without
importing the class. Classes whose configs nest other configs (`sub_configs`) are not kept
that way: they are resolved by transformers on every start.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from kvflow.cache import cache_root, write_atomically

logger = logging.getLogger(__name__)


def _entry_path(config_json: bytes) -> Path:
    import transformers

    key = hashlib.sha256(config_json + transformers.__version__.encode()).hexdigest()[:24]
    return cache_root() / "configs" / f"{key}.json"


def _rebuild(entry: dict[str, Any], path: Path) -> Any:
    from transformers import PreTrainedConfig

    # The class's aliases (Mixtral's num_experts -> num_local_experts) are class attributes
    # that PreTrainedConfig resolves on every attribute access: a subclass carries them.
    resolved = type(entry["class"], (PreTrainedConfig,),
                    {"model_type": entry["fields"]["model_type"],
                     "attribute_map": entry["attribute_map"]})
    # The entry may have been made from another copy of the same files.
    fields = {**entry["fields"], "_name_or_path": str(path)}
    config = resolved.from_dict(fields)
    for name, value in fields.items():  # what the base class's init sets aside (use_cache)
        if not hasattr(config, name):
            setattr(config, name, value)
    return config


def load_hf_config(path: str | Path) -> Any:
    """The transformers config of the checkpoint directory `path`."""
    config_json = Path(path, "config.json").read_bytes()
    entry_path = _entry_path(config_json)
    if entry_path.exists():
        try:
            return _rebuild(json.loads(entry_path.read_text()), Path(path))
        except (ValueError, KeyError, TypeError) as exc:  # a damaged entry: resolve again
            logger.warning("ignoring %s (%s)", entry_path, exc)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if not getattr(config, "sub_configs", None):
        entry = {"class": type(config).__name__, "attribute_map": type(config).attribute_map,
                 "fields": config.to_dict()}
        try:
            write_atomically(entry_path, json.dumps(entry))
        except OSError as exc:  # a read-only cache costs later starts a second, nothing else
            logger.warning("could not keep the resolved config in %s: %s", entry_path, exc)
    return config
