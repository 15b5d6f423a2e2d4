"""One rank, in the engine's process: today's path, with nothing between the engine and
its runner."""
from __future__ import annotations

from kvflow.attention.base import AttentionBackend
from kvflow.executor.base import Executor, ModelSpec, RunnerSettings
from kvflow.models.config import ModelConfig
from kvflow.spec_decode.proposer import Speculator
from kvflow.worker.model_runner import ModelRunner


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
                                  settings.seed, speculator, settings.batch_invariant)
