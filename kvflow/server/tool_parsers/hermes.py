"""The hermes format, Qwen2.5's and Qwen3's: each call is
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, with text around the calls.

A block that opens as these models write it (`{"name": "...", "arguments": {`) is a call
from that point, so its arguments stream as they come: they are the object's text as
written, up to where the object closes (or the block, or the output, ends: a call cut
short keeps what it has). Any other block is read once it closes: a JSON object with a
name (and `arguments` or `parameters`) is a call, anything else stays in the content as
written. With no calls, the content is the text unchanged; with calls, it is the text
outside them with trailing whitespace removed, or None if only whitespace is left. JSON
that nests past json_depth.MAX_JSON_DEPTH is never parsed: such a block is no call, and
such arguments run to the end of their block.
"""
from __future__ import annotations

import json
import re

from kvflow import json_depth
from kvflow.server.tool_parsers.base import (ParsedCall, ToolParse, ToolParser, arguments_text,
                                             register_tool_parser)

START, END = "<tool_call>", "</tool_call>"
# The opening of a call whose arguments can stream: the name, then the arguments object.
_OPENING = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')


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
                outside.append(tail if final else _without_partial(tail, START))
                break
            outside.append(text[position:start])
            end = text.find(END, start + len(START))
            closed = end >= 0 or final
            body = text[start + len(START):end if end >= 0 else len(text)]
            if not closed:
                body = _without_partial(body, END)
            opening = _opening(body)
            if opening is not None:
                name, arguments_start = opening
                calls.append(ParsedCall(name, _arguments_so_far(body, arguments_start)))
            elif closed:
                call = _call(body)
                if call is None:
                    outside.append(text[start:end + len(END) if end >= 0 else len(text)])
                else:
                    calls.append(call)
            if not closed:
                break  # an open block: nothing after it is settled yet
            position = len(text) if end < 0 else end + len(END)
        content = "".join(outside)
        if final and not calls:
            return ToolParse(content)
        # A later call would strip trailing whitespace (and a blank content is None), so a
        # partial parse holds both back.
        return ToolParse(content.rstrip() if content.strip() else (None if final else ""),
                         tuple(calls))


def _opening(body: str) -> tuple[str, int] | None:
    """The call's name and where its arguments object starts, if the body opens so."""
    match = _OPENING.match(body)
    if match is None:
        return None
    try:
        return json.loads(match.group(1)), match.end()
    except ValueError:  # an escape JSON does not have: read the block once it closes
        return None


def _arguments_so_far(body: str, start: int) -> str:
    """The arguments object's text from `start`: up to its closing brace once it has one,
    else all there is (every character of it is inside the object). An object that nests
    too deep to parse never closes, as one that is not JSON."""
    if not json_depth.within_json_depth(body[start:]):
        return body[start:]
    try:
        _, end = json.JSONDecoder().raw_decode(body, start)
    except ValueError:
        return body[start:]
    return body[start:end]


def _without_partial(text: str, tag: str) -> str:
    """`text` less a suffix that may be the start of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return text[:-length]
    return text


def _call(body: str) -> ParsedCall | None:
    try:
        call = json_depth.loads(body)
    except ValueError:  # not JSON, or nested too deep to parse: no call
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return ParsedCall(call["name"], arguments_text(arguments))
