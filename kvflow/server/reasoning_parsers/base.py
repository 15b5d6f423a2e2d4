"""Reasoning parsers: a thinking model's output split into its reasoning and its answer,
and the registry --reasoning-parser picks from.

As with tool parsers (tool_parsers/base.py), a partial split (`final=False`) holds only
what no later text can change, so a stream of differences reassembles to the final split.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvflow.server.registry import Registry


@dataclass(frozen=True)
class ReasoningParser:
    """Reasoning between `start` and `end` tags. `starts_inside`: the output begins inside
    the reasoning (the template opened it), an opening tag at its start skipped; else the
    reasoning is a block that opens the output, or there is none."""

    start: str
    end: str
    starts_inside: bool

    def split(self, text: str, final: bool) -> tuple[str | None, str | None]:
        """(reasoning, answer): None for a part the output does not have (yet). The
        answer's leading whitespace (models write a blank line after the reasoning) is
        left out."""
        if not final and self.start.startswith(text) and text != self.start:
            return None, None  # maybe the opening tag: undecided until it is whole
        if text.startswith(self.start):
            body = text[len(self.start):]
        elif self.starts_inside:
            body = text
        else:
            return None, text  # no reasoning block: all answer
        close = body.find(self.end)
        if close < 0:
            return (body if final else _without_partial(body, self.end)), None
        return body[:close], body[close + len(self.end):].lstrip()


def _without_partial(text: str, tag: str) -> str:
    """`text` less a suffix that may be the start of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return text[:-length]
    return text


REASONING_PARSERS: Registry[ReasoningParser] = Registry("--reasoning-parser")
register_reasoning_parser = REASONING_PARSERS.add
reasoning_parser_names = REASONING_PARSERS.names
get_reasoning_parser = REASONING_PARSERS.create
