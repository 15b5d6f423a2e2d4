"""The `<think>...</think>` formats.

qwen3: Qwen3 writes `<think>` itself when it thinks; with enable_thinking false its
template closes an empty block in the prompt and the output is all answer.
deepseek_r1: DeepSeek-R1's template opens the block in the prompt, so the output starts
inside the reasoning, with or without a `<think>` of its own; an output that never closes
it is all reasoning.
"""
from __future__ import annotations

from functools import partial

from kvflow.server.reasoning_parsers.base import ReasoningParser, register_reasoning_parser

register_reasoning_parser("qwen3", partial(ReasoningParser, "<think>", "</think>",
                                           starts_inside=False))
register_reasoning_parser("deepseek_r1", partial(ReasoningParser, "<think>", "</think>",
                                                 starts_inside=True))
