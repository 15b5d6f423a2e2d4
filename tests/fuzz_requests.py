"""Random chat requests for the grammar and tool paths, within the server's limits: JSON
schemas (supported keywords, refused ones, bad values), regular expressions (some that do
not parse), choices and tool lists with every tool_choice. A seeded random.Random makes
each sequence reproducible."""
from __future__ import annotations

import random
import string
from typing import Any

_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
_FORMATS = ("date", "time", "email", "uuid", "ipv4", "nonesuch")
_REFUSED = ({"not": {"type": "string"}}, {"uniqueItems": True}, {"x-guidance": {}},
            {"multipleOf": -1}, {"minimum": 5, "maximum": 1}, {"$ref": "#/$defs/missing"})
_ATOMS = ("a", "b", "[a-z]", "[0-9]", "\\d", "\\w", ".", "\\.", "x|y", "(", ")", "[", "é")
_QUANTIFIERS = ("", "", "*", "+", "?", "{2}", "{1,3}", "{0,40}", "{3,}")


def schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    kind = rng.choice(_TYPES if depth < 4 else _TYPES[:5])
    node: dict[str, Any] = {"type": kind}
    if kind == "object":
        names = rng.sample(string.ascii_lowercase, rng.randint(0, 4))
        node["properties"] = {name: schema(rng, depth + 1) for name in names}
        node["required"] = rng.sample(names, rng.randint(0, len(names)))
        node["additionalProperties"] = rng.random() < 0.3
    elif kind == "array":
        node["items"] = schema(rng, depth + 1)
        node["maxItems"] = rng.randint(0, 4)
    elif kind == "string" and rng.random() < 0.3:
        node["maxLength"] = rng.randint(0, 20)
    elif kind == "string" and rng.random() < 0.3:
        node["format"] = rng.choice(_FORMATS)
    elif kind in ("integer", "number") and rng.random() < 0.4:
        node["multipleOf"] = rng.choice((3, 0.5, 7))
        node["minimum"] = rng.randint(-100, 100)
    if rng.random() < 0.1:
        node = {"anyOf": [node, schema(rng, depth + 1)]}
    if rng.random() < 0.05:
        node.update(rng.choice(_REFUSED))
    if rng.random() < 0.05:
        node = {"enum": [rng.randint(0, 9), "x", None]}
    return node


def regex(rng: random.Random) -> str:
    return "".join(rng.choice(_ATOMS) + rng.choice(_QUANTIFIERS)
                   for _ in range(rng.randint(1, 8)))


def tools(rng: random.Random) -> tuple[list[dict[str, Any]], Any]:
    """A tool list and a tool_choice for it (or for a tool it lacks)."""
    names = [rng.choice(("get", "put", "f", "bad name!", "x" * 70)) + str(rng.randint(0, 3))
             for _ in range(rng.randint(1, 5))]
    listed = [{"type": "function", "function": {
        "name": name, **({"parameters": schema(rng)} if rng.random() < 0.8 else {})}}
        for name in names]
    choice = rng.choice(("none", "auto", "required", "named", None))
    if choice == "named":
        choice = {"type": "function", "function": {"name": rng.choice(names + ["absent"])}}
    return listed, choice


def chat_request(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": rng.randint(1, 12), "seed": rng.randint(0, 99)}
    kind = rng.choice(("json_schema", "guided_json", "regex", "choice", "tools"))
    if kind == "json_schema":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "s", "schema": schema(rng)}}
    elif kind == "guided_json":
        body["guided_json"] = schema(rng)
    elif kind == "regex":
        body["guided_regex"] = regex(rng)
    elif kind == "choice":
        body["guided_choice"] = [regex(rng) for _ in range(rng.randint(1, 4))]
    else:
        body["tools"], choice = tools(rng)
        if choice is not None:
            body["tool_choice"] = choice
    return body
