"""A constraint on the answer after a reasoning model's thinking: the output reasons freely
up to the first closing tag, then follows the constraint (vLLM starts the grammar where
the reasoning ends; here one grammar covers both, so the matcher needs no switch)."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

from kvflow.sampling_params import StructuredOutputsParams

# Rust regex metacharacters, and the slash that closes a Lark regex. `<` and `>` stay bare:
# escaped, they are word boundaries.
_REGEX_SPECIAL = set("\\.+*?()|[]{}^$#&-~/")


@dataclass
class AfterReasoning(StructuredOutputsParams):
    """`reasoning_start`: the reasoning block's opening tag; the block is then optional and
    must open the output (Qwen3 writes none when thinking is off). None: the output starts
    inside the reasoning (DeepSeek-R1, whose template opens it)."""

    reasoning_start: str | None = None
    reasoning_end: str = "</think>"

    @classmethod
    def wrap(cls, params: StructuredOutputsParams, start: str | None,
             end: str) -> AfterReasoning:
        return cls(**{f.name: getattr(params, f.name) for f in fields(StructuredOutputsParams)},
                   reasoning_start=start, reasoning_end=end)


def after_reasoning_grammar(answer: str, start: str | None, end: str) -> str:
    """llguidance's grammar: a lazy lexeme (it ends at the first `end`) for the reasoning,
    optional whitespace, then `answer` (a grammar as the compiler builds it: llguidance's
    JSON form or Lark text) referenced by name."""
    reasoning = f"/{_escaped(start or '')}(?s:.*){_escaped(end)}/"
    # Without a block the answer starts the output: whitespace may only follow a block.
    top = (f"start: reasoning ws? @answer{' | @answer' if start else ''}\n"
           f"reasoning[lazy]: {reasoning}\nws: /[ \\t\\r\\n]+/\n")
    try:
        answers = json.loads(answer)["grammars"]
    except ValueError:
        answers = [{"lark_grammar": answer}]
    answers[0] = {**answers[0], "name": "answer"}
    return json.dumps({"grammars": [{"name": "reasoning", "lark_grammar": top}, *answers]})


def _escaped(text: str) -> str:
    return "".join("\\" + char if char in _REGEX_SPECIAL else char for char in text)
