"""Which architectures kvflow runs, and how to build each: the model registry.

A family file (kvflow/models/llama.py, gemma.py, phi3.py, moe.py, gpt_oss.py) composes the shared
blocks of kvflow/models/blocks.py into its decoder and registers, per Hugging Face
architecture name, its model class (whose `packed_modules` maps checkpoint projections
onto fused layers, and `expert_projections` experts' onto their stacked tensors) and its
config reader, which turns a transformers config into a ModelConfig and
refuses, by name, any field the family file does not implement. A family that kvflow
reads from GGUF files also registers its `GgufLayout` (kvflow/models/gguf/layout.py), which
a file's `general.architecture` finds. Adding a family is one file and one line in
FAMILY_MODULES (docs/architecture.md walks through it).
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
    from kvflow.models.gguf.layout import GgufLayout

# The modules that register families, imported on first use of the registry.
FAMILY_MODULES = ("kvflow.models.llama", "kvflow.models.gemma", "kvflow.models.phi3",
                  "kvflow.models.moe", "kvflow.models.gpt_oss")


@dataclass(frozen=True)
class ModelFamily:
    architecture: str  # as a checkpoint's config.json names it
    model_class: type[CausalLM]
    read_config: Callable[[Any, Path], ModelConfig]  # (transformers config, checkpoint dir)
    gguf: GgufLayout | None = None  # how llama.cpp's GGUF files hold it (None: not read)


_FAMILIES: dict[str, ModelFamily] = {}
_loaded = False


def register(family: ModelFamily) -> None:
    if family.architecture in _FAMILIES:
        raise ValueError(f"architecture {family.architecture!r} is registered twice")
    layout = family.gguf
    if layout is not None and any(
            (f.gguf.architecture, f.gguf.has_experts) == (layout.architecture, layout.has_experts)
            for f in _FAMILIES.values() if f.gguf is not None):
        raise ValueError(f"GGUF architecture {layout.architecture!r} "
                         f"{'with' if layout.has_experts else 'without'} experts is registered "
                         "twice")
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


def gguf_families() -> dict[str, list[ModelFamily]]:
    """llama.cpp's architecture name -> the families kvflow runs its files as: one, or
    one without experts and one with them (llama.cpp's "llama" is Llama's and Mixtral's;
    see GgufLayout.has_experts)."""
    families: dict[str, list[ModelFamily]] = {}
    for family in _families().values():
        if family.gguf is not None:
            families.setdefault(family.gguf.architecture, []).append(family)
    return families
