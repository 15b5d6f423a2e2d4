"""What the API server knows of an engine: an EngineClient. The server submits prepared
requests and reads their outputs, aborts them, and reads the engine's published figures;
it never reaches into the engine's scheduler, runner or model, so that an engine core can
live elsewhere: on a thread of the server's process (kvflow/engine/async_engine.py), or
several in processes of their own behind a router (kvflow/engine/dp_client.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvflow.engine.stats import EngineStats, StepObservations
from kvflow.models.config import ModelConfig
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvflow.engine.input_preparer import PreparedRequest, PromptType
    from kvflow.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class EngineFacts:
    """What is fixed once an engine has loaded."""

    tokenizer: Any
    model_config: ModelConfig
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    max_num_seqs: int
    kv_cache_tokens: int
    block_size: int
    prefix_caching: bool
    num_speculative_tokens: int
    cache_config_info: dict[str, str]  # for /load and the metrics' cache_config_info
    # Bytes of the weights held over every rank (quantized ones at their own size): the
    # experts' apart, as the roofline prices them per expert read.
    weight_bytes: int
    expert_bytes: int
    num_threads: int  # each rank's CPU threads (1 on a GPU)

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineFacts:
        weight_bytes, expert_bytes = engine.executor.held_bytes()
        return cls(
            tokenizer=engine.tokenizer, model_config=engine.model_config, dtype=engine.dtype,
            device=engine.device, max_model_len=engine.max_model_len,
            max_num_seqs=engine.scheduler_config.max_num_seqs,
            kv_cache_tokens=engine.cache_config.num_tokens,
            block_size=engine.cache_config.block_size,
            prefix_caching=engine.kv_manager.enable_caching,
            num_speculative_tokens=engine.num_speculative_tokens,
            cache_config_info=engine.cache_config_info(),
            weight_bytes=weight_bytes - expert_bytes, expert_bytes=expert_bytes,
            num_threads=engine.num_threads)


@dataclass(frozen=True)
class CoreState:
    """One engine core as its client sees it, for /load, /health and the metrics."""

    index: int
    alive: bool
    stats: EngineStats
    num_requests: int  # requests it is answering
    num_waiting: int  # sequences it has not admitted
    routed: dict[str, int]  # how often the router chose it, by decision (router.DECISIONS)
    failure: str | None = None  # why it stopped


@dataclass
class InFlight:
    """A request being answered, as its consumer on the event loop last saw it."""

    request_id: str
    arrival_time: float  # time.monotonic()
    num_prompt_tokens: int
    num_generated: int = 0
    first_token_time: float | None = None

    def saw(self, output: RequestOutput) -> None:
        self.num_generated = sum(len(c.token_ids) for c in output.outputs)
        if output.metrics is not None:
            self.first_token_time = output.metrics.first_token_time


class EngineClient(ABC):
    facts: EngineFacts
    # Requests between generate()'s first and last output, by id (the dashboard's slowest).
    in_flight: dict[str, InFlight]

    @abstractmethod
    def prepare_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                        priority: int = 0) -> PreparedRequest:
        """Tokenize and validate, on the calling thread (raises ParameterError or
        ValueError naming the bad value)."""

    @abstractmethod
    def generate(self, prepared: PreparedRequest) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine makes them; leaving early aborts it."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        ...

    @abstractmethod
    def abort_all(self, reason: str) -> None:
        """Ends every request's stream with `reason`."""

    @abstractmethod
    async def reset_prefix_cache(self) -> int:
        """Forgets every cached block; returns how many."""

    @property
    @abstractmethod
    def alive(self) -> bool:
        ...

    @property
    def degraded(self) -> bool:
        """Some engine cores have stopped and the others serve on."""
        return False

    @abstractmethod
    def cores(self) -> list[CoreState]:
        """Each engine core's state, in core order."""

    @property
    @abstractmethod
    def num_waiting_sequences(self) -> int:
        """Sequences submitted and not yet admitted."""

    @abstractmethod
    def has_unfinished_requests(self) -> bool:
        ...

    @property
    @abstractmethod
    def stats(self) -> EngineStats:
        """The engine's latest published figures (safe from any thread)."""

    @property
    @abstractmethod
    def observations(self) -> StepObservations:
        """Per-step records that /metrics and the dashboard drain."""

    @abstractmethod
    def check_answers(self) -> None:
        """Runs a probe request to its end before start(): raises if the engine cannot."""

    @abstractmethod
    def start(self) -> None:
        ...

    @abstractmethod
    def shutdown(self, grace_s: float) -> None:
        """Lets running requests finish for up to grace_s seconds, then aborts the rest."""
