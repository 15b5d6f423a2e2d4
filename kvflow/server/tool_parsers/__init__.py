"""Tool-call parsers, one format per module, each registered under its --tool-call-parser
name: every module here is imported, so a new format is one new module."""
from __future__ import annotations

import importlib
import pkgutil

from kvflow.server.tool_parsers.base import (ParsedCall, ToolParse, ToolParser, get_tool_parser,
                                             tool_parser_names)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ParsedCall", "ToolParse", "ToolParser", "get_tool_parser", "tool_parser_names"]
