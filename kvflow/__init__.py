"""kvflow: an LLM inference engine with a paged KV cache and continuous batching."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvflow.logger import configure_logging

configure_logging()

if TYPE_CHECKING:
    from kvflow.engine.args import EngineArgs
    from kvflow.engine.llm_engine import LLMEngine
    from kvflow.entrypoints.llm import LLM
    from kvflow.inputs import TextPrompt, TokensPrompt
    from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
    from kvflow.sampling_params import SamplingParams, StructuredOutputsParams

# Imported on first use, not with the package: importing torch takes a second or two, and
# `kvflow serve` starts work of its own (kvflow/cli.py) before it does.
_EXPORTS = {
    "LLM": "kvflow.entrypoints.llm", "LLMEngine": "kvflow.engine.llm_engine",
    "EngineArgs": "kvflow.engine.args", "SamplingParams": "kvflow.sampling_params",
    "StructuredOutputsParams": "kvflow.sampling_params", "RequestOutput": "kvflow.outputs",
    "CompletionOutput": "kvflow.outputs", "Logprob": "kvflow.outputs",
    "TextPrompt": "kvflow.inputs", "TokensPrompt": "kvflow.inputs",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
