"""One rank, in the engine's process: today's path, with nothing between the engine and
its runner."""
from __future__ import annotations

import logging

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.attention.cpu import CpuNativeBackend
from kvflow.executor.base import Executor, ModelSpec, RunnerSettings
from kvflow.models.config import ModelConfig
from kvflow.spec_decode.proposer import Speculator
from kvflow.worker.cpu_graphs import cpu_capture
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
                                  max_model_len=settings.max_model_len,
                                  native_ops=self.spec.kernels().native_ops)

    def _graphs(self, settings: RunnerSettings, backend: AttentionBackend
                ) -> DecodeGraphs | None:
        if not settings.graph_sizes:
            return None
        device = self.spec.device
        why_not = why_not_captured(self._model, backend, device)
        if why_not is None and device.type != "cuda" and not isinstance(backend,
                                                                         CpuNativeBackend):
            why_not = "on the CPU only the native kernels' calls are recorded"
        if why_not is not None:
            logger.info("decode graphs: off, %s", why_not)
            return None
        capture = (cuda_capture(torch.cuda.graph_pool_handle()) if device.type == "cuda"
                   else cpu_capture(backend.ops))
        return DecodeGraphs(self._model, list(settings.graph_sizes), settings.block_size,
                            settings.max_model_len, device, capture, settings.num_drafts)
