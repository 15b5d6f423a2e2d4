"""Which architectures kvflow runs, and how to build each: the model registry.

A family file (kvflow/models/llama.py, gemma.py, phi3.py) composes the shared blocks of
kvflow/models/blocks.py into its decoder and registers, per Hugging Face architecture
name, its model class (whose `packed_modules` maps checkpoint projections onto fused
layers) and its config reader, which turns a transformers config into a ModelConfig and
refuses, by name, any field the family file does not implement. A GGUF file's
`general.architecture` maps onto the same entries. Adding a family is one file and one
line in FAMILY_MODULES (docs/architecture.md walks through it).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvflow.models.blocks import CausalLM
    from kvflow.models.config import ModelConfig

# The modules that register families, imported on first use of the registry.
FAMILY_MODULES = ("kvflow.models.llama", "kvflow.models.gemma", "kvflow.models.phi3")


@dataclass(frozen=True)
class ModelFamily:
    architecture: str  # as a checkpoint's config.json names it
    model_class: type[CausalLM]
    read_config: Callable[[Any, Path], ModelConfig]  # (transformers config, checkpoint dir)
    gguf_architecture: str | None = None  # llama.cpp's general.architecture for it


_FAMILIES: dict[str, ModelFamily] = {}
_loaded = False


def register(family: ModelFamily) -> None:
    if family.architecture in _FAMILIES:
        raise ValueError(f"architecture {family.architecture!r} is registered twice")
    _FAMILIES[family.architecture] = family


def _families() -> dict[str, ModelFamily]:
    global _loaded
    if not _loaded:
        for module in FAMILY_MODULES:
            importlib.import_module(module)
        _loaded = True
    return _FAMILIES


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_families()))


def family_for(architecture: str) -> ModelFamily:
    families = _families()
    if architecture not in families:
        raise ValueError(f"architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(sorted(families))}")
    return families[architecture]


def gguf_architectures() -> dict[str, str]:
    """llama.cpp's architecture name -> the Hugging Face one kvflow runs it as."""
    return {f.gguf_architecture: f.architecture for f in _families().values()
            if f.gguf_architecture is not None}
