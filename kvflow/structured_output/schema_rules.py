"""What kvflow refuses in a JSON schema that llguidance would compile: values JSON Schema
forbids, and options that are kvflow's to set.

llguidance reads compile options from a schema's top-level "x-guidance" after kvflow's
defaults, so a client's options would change the JSON layout the README promises (and
that every request shares); refusing them says so, where ignoring them would not.
"""
from __future__ import annotations

from typing import Any

from kvflow.sampling_params import ParameterError

# Keywords whose values are data, not schemas: a "multipleOf" inside them is no keyword.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def check_schema(schema: Any) -> None:
    """Raises ParameterError("structured_outputs", ...) for a schema kvflow refuses."""
    if isinstance(schema, dict) and "x-guidance" in schema:
        raise ParameterError("structured_outputs", "the JSON schema sets x-guidance options, "
                             "which kvflow does not take: it writes JSON its own way (see "
                             "the README's Structured output)")
    pending = [schema]
    while pending:  # iterative: a schema may nest as deep as its size limit allows
        node = pending.pop()
        if isinstance(node, dict):
            multiple = node.get("multipleOf")
            if isinstance(multiple, (int, float)) and not isinstance(multiple, bool) \
                    and not multiple > 0:  # NaN too: Python's json reads it
                raise ParameterError("structured_outputs", "multipleOf must be greater than "
                                                           f"0, got {multiple}")
            pending.extend(value for key, value in node.items() if key not in _DATA_KEYWORDS)
        elif isinstance(node, list):
            pending.extend(node)
