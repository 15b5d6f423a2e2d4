"""kvflow: an LLM inference engine with a paged KV cache and continuous batching."""
from kvflow.engine.args import EngineArgs
from kvflow.engine.llm_engine import LLMEngine
from kvflow.entrypoints.llm import LLM
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
from kvflow.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput",
           "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
