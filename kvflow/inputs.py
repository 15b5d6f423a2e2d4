"""Prompt shapes, with vLLM's names: LLM.generate takes these dicts, or a plain string."""
from __future__ import annotations

from typing import NotRequired, TypedDict


class TextPrompt(TypedDict):
    prompt: str
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]  # the text, when the caller has it: outputs carry it back
    cache_salt: NotRequired[str]
