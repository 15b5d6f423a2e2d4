"""Reasoning parsers, registered under their --reasoning-parser names: every module here
is imported, so a new format is one new module."""
from __future__ import annotations

import importlib
import pkgutil

from kvflow.server.reasoning_parsers.base import (ReasoningParser, get_reasoning_parser,
                                                  reasoning_parser_names)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ReasoningParser", "get_reasoning_parser", "reasoning_parser_names"]
