"""One rank, in the engine's process: today's path, with nothing between the engine and
its runner."""
from __future__ import annotations

import logging

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.executor.base import Executor, ModelSpec, RunnerSettings
from kvflow.models.config import ModelConfig
from kvflow.spec_decode.proposer import Speculator
from kvflow.worker.cuda_graphs import DecodeGraphs, cuda_capture, why_not_captured
from kvflow.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class UniProcExecutor(Executor):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._model = spec.build()

    @property
    def rank_config(self) -> ModelConfig:
        return self.spec.config

    def initialize(self, settings: RunnerSettings, backend: AttentionBackend,
                   speculator: Speculator | None) -> None:
        self.runner = ModelRunner(self._model, self.spec.config, backend, settings.num_blocks,
                                  settings.block_size, self.spec.dtype, self.spec.device,
                                  settings.seed, speculator, settings.batch_invariant,
                                  graphs=self._graphs(settings, backend),
                                  max_model_len=settings.max_model_len)

    def _graphs(self, settings: RunnerSettings, backend: AttentionBackend
                ) -> DecodeGraphs | None:
        if not settings.graph_sizes:
            return None
        why_not = why_not_captured(self._model, backend)
        if why_not is not None:
            logger.info("CUDA graphs: off, %s", why_not)
            return None
        return DecodeGraphs(self._model, list(settings.graph_sizes), settings.block_size,
                            settings.max_model_len, self.spec.device,
                            cuda_capture(torch.cuda.graph_pool_handle()), settings.num_drafts)
