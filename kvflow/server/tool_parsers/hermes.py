"""The hermes format, Qwen2.5's and Qwen3's: each call is
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, with text around the calls.

A block whose body is not a call (not JSON, or no name) stays in the content, as written.
With no calls, the content is the text unchanged; with calls, it is the text outside them
with trailing whitespace removed, or None if only whitespace is left.
"""
from __future__ import annotations

import json

from kvflow.server.tool_parsers.base import (ParsedCall, ToolParse, ToolParser, arguments_text,
                                             register_tool_parser)

START, END = "<tool_call>", "</tool_call>"


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    def parse(self, text: str, final: bool) -> ToolParse:
        outside: list[str] = []
        calls: list[ParsedCall] = []
        position = 0
        while True:
            start = text.find(START, position)
            if start < 0:
                tail = text[position:]
                outside.append(tail if final else _without_partial_tag(tail))
                break
            outside.append(text[position:start])
            end = text.find(END, start + len(START))
            if end < 0 and not final:
                break  # an open block: nothing after its start is settled yet
            close = len(text) if end < 0 else end + len(END)
            call = _call(text[start + len(START):end if end >= 0 else len(text)])
            if call is None:
                outside.append(text[start:close])
            else:
                calls.append(call)
            position = close
        content = "".join(outside)
        if final and not calls:
            return ToolParse(content)
        # A later call would strip trailing whitespace (and a blank content is None), so a
        # partial parse holds both back.
        return ToolParse(content.rstrip() if content.strip() else (None if final else ""),
                         tuple(calls))


def _without_partial_tag(text: str) -> str:
    """`text` less a suffix that may be the start of a call's tag."""
    for length in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-length:]):
            return text[:-length]
    return text


def _call(body: str) -> ParsedCall | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return ParsedCall(call["name"], arguments_text(arguments))
