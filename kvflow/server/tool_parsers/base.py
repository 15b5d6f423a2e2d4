"""What a tool-call parser returns, and the registry --tool-call-parser picks from.

A parser reads the model's text, whole or as far as it has come. A stream sends the
differences between successive parses, so a partial parse (`final=False`) holds only what
no later text can change: its content is a prefix of every later parse's content, its
calls are the first calls of every later parse, each call's arguments a prefix of its later
arguments. The final parse is the non-streamed result; a stream that follows the rule
reassembles to it exactly.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvflow.server.registry import Registry


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI's function.arguments


@dataclass(frozen=True)
class ToolParse:
    content: str | None  # the text outside the calls; None when there is none
    calls: tuple[ParsedCall, ...] = ()


class ToolParser(ABC):
    @abstractmethod
    def parse(self, text: str, final: bool) -> ToolParse:
        """The calls in `text` and the text around them; `final` says the output is
        complete (else see the module's rule)."""


def arguments_text(arguments: Any) -> str:
    """A call's arguments as OpenAI sends them: JSON text (a string the model wrote is
    taken as that text)."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


TOOL_PARSERS: Registry[ToolParser] = Registry("--tool-call-parser")
tool_parser_names = TOOL_PARSERS.names
get_tool_parser = TOOL_PARSERS.create


def register_tool_parser(name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
    def register(cls: type[ToolParser]) -> type[ToolParser]:
        TOOL_PARSERS.add(name, cls)
        return cls
    return register
