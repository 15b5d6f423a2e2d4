"""kvflow: an LLM inference engine with a paged KV cache and continuous batching."""
from kvflow.logger import configure_logging

configure_logging()

from kvflow.engine.args import EngineArgs  # noqa: E402
from kvflow.engine.llm_engine import LLMEngine  # noqa: E402
from kvflow.entrypoints.llm import LLM  # noqa: E402
from kvflow.inputs import TextPrompt, TokensPrompt  # noqa: E402
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from kvflow.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402

__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "StructuredOutputsParams",
           "RequestOutput", "CompletionOutput", "Logprob", "TextPrompt", "TokensPrompt"]
__version__ = "0.1.0"
