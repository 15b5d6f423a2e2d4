"""Sampling defaults from a checkpoint's generation_config.json, as vLLM's
--generation-config and --override-generation-config: model makers put their recommended
temperature, top_p and so on there, and a request that leaves a field unset gets them.

Only the keys written in the file count. transformers' GenerationConfig fills in its own
class defaults (top_k 50, temperature 1.0) for keys the file lacks, so the JSON is read
directly instead.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kvflow.config import parse_json_object
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
# generation_config.json's keys that become defaults, each with the SamplingParams field it
# sets (vLLM's set; do_sample is ignored by vLLM too: a temperature of 0 is greedy).
DEFAULT_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                "max_new_tokens": "max_tokens"}
MODES = ("auto", "vllm")  # or a folder


def parse_override(value: str | dict[str, Any] | None) -> dict[str, Any]:
    """--override-generation-config as JSON text or a dict, in generation_config.json's
    keys; raises ValueError for anything else."""
    if value is None:
        return {}
    value = parse_json_object(value, "override_generation_config")
    unknown = sorted(set(value) - set(DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"override_generation_config: {', '.join(unknown)} not supported; "
                         f"it takes {', '.join(DEFAULT_KEYS)}")
    return dict(value)


def load_generation_defaults(mode: str, model_path: str | Path,
                             override: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams fields (by their names) that requests get unless they set them:
    `mode` "auto" reads the checkpoint's generation_config.json, "vllm" none, anything else
    is a folder holding one; `override` (generation_config.json's keys) goes on top.
    Raises ValueError for a folder without the file or values SamplingParams refuses."""
    if mode == "vllm":
        found: dict[str, Any] = {}
        source = None
    else:
        folder = Path(model_path) if mode == "auto" else Path(mode).expanduser()
        path = folder / GENERATION_CONFIG_FILE
        if mode != "auto" and not path.is_file():
            raise ValueError(f"generation_config: no {GENERATION_CONFIG_FILE} in {folder}")
        found = _read(path) if path.is_file() else {}
        source = path
    values = {**found, **{k: v for k, v in override.items() if v is not None}}
    defaults = {DEFAULT_KEYS[key]: value for key, value in values.items()}
    try:
        SamplingParams(**defaults)
        if defaults.get("max_tokens", 1) < 1:  # 0 would leave requests nothing to generate
            raise ValueError(f"max_new_tokens must be at least 1, got {defaults['max_tokens']}")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"generation defaults from {source or 'the override'}: {exc}") from None
    if found:
        logger.info("sampling defaults from %s: %s (a request that sets one overrides it; "
                    "--generation-config vllm ignores the file)", source, _listed(found))
    if override:
        logger.info("sampling defaults from --override-generation-config: %s",
                    _listed(override))
    return defaults


def _read(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} could not be read: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return {key: config[key] for key in DEFAULT_KEYS if config.get(key) is not None}


def _listed(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())
