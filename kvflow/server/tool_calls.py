"""tool_choice "required" and a named function: the output is constrained by a JSON
schema built from the declared tools, so the calls always parse, whatever the model or the
tool-call parser. A named function's output is its arguments; "required" writes a JSON
array of {"name", "arguments"} objects, one per call.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from kvflow.json_depth import within_json_depth
from kvflow.sampling_params import StructuredOutputsParams
from kvflow.server.tool_parsers.base import ParsedCall, ToolParse, ToolParser, arguments_text

# A function declared without parameters takes none (OpenAI's rule).
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def named_call_constraint(parameters: dict[str, Any] | None) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=parameters or NO_PARAMETERS)


def required_calls_constraint(tools: dict[str, dict[str, Any] | None],
                              parallel: bool) -> StructuredOutputsParams:
    """`tools`: each function's name and parameters schema. A parameters schema with local
    $refs (pydantic writes its models' $defs so) moves to the combined schema's $defs, its
    refs rewritten to point there: nested as an item, "#/$defs/x" would name nothing."""
    defs: dict[str, Any] = {}
    calls = []
    for i, (name, parameters) in enumerate(tools.items()):
        arguments = parameters or NO_PARAMETERS
        if _has_local_ref(arguments):
            defs[f"tool{i}"] = _rebased(arguments, f"#/$defs/tool{i}")
            arguments = {"$ref": f"#/$defs/tool{i}"}
        calls.append({"type": "object", "properties": {"name": {"const": name},
                                                      "arguments": arguments},
                      "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return StructuredOutputsParams(json=schema)


def _has_local_ref(value: Any) -> bool:
    if isinstance(value, dict):
        ref = value.get("$ref")
        return (isinstance(ref, str) and ref.startswith("#")) or any(
            _has_local_ref(v) for v in value.values())
    return isinstance(value, list) and any(_has_local_ref(v) for v in value)


def _rebased(value: Any, root: str) -> Any:
    """value with every local $ref ("#", "#/...") made relative to the pointer `root`
    (client schemas are depth-checked before they get here)."""
    if isinstance(value, list):
        return [_rebased(v, root) for v in value]
    if not isinstance(value, dict):
        return value
    rebased = {k: _rebased(v, root) for k, v in value.items()}
    ref = value.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        rebased["$ref"] = root + ref[1:]
    return rebased


class NamedCallParser(ToolParser):
    """The whole output is the named function's arguments: one call, known from the
    start, whose arguments grow with the text (cut short if the output is)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str, final: bool) -> ToolParse:
        return ToolParse(None, (ParsedCall(self.name, text),))


class RequiredCallsParser(ToolParser):
    """A JSON array of calls; each call is reported once its object is complete (an
    output cut short keeps the calls it completed, and so does one whose next call nests
    past json_depth.MAX_JSON_DEPTH)."""

    def parse(self, text: str, final: bool) -> ToolParse:
        decoder = json.JSONDecoder()
        calls: list[ParsedCall] = []
        position = _skip_space(text, 0)
        if not text.startswith("[", position):
            return ToolParse(None)
        position += 1
        while True:
            position = _skip_space(text, position)
            if not within_json_depth(text[position:]):  # a call too deep to parse ends them
                break
            try:
                call, position = decoder.raw_decode(text, position)
            except ValueError:
                break
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                break
            calls.append(ParsedCall(call["name"], arguments_text(call.get("arguments", {}))))
            position = _skip_space(text, position)
            if not text.startswith(",", position):
                break
            position += 1
        return ToolParse(None, tuple(calls))


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
