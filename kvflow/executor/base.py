"""How the engine runs its model: through an executor, which holds the ranks.

The engine hands an executor each step's SchedulerOutput and gets a RunnerOutput back
(`submit`, then `finish`: a pipeline holds several steps at once); it never touches a
model. The runner in the engine's own process (rank 0's) samples,
computes grammar masks and holds the speculator's state, so that what a step returns is
made where the scheduler is; other ranks, where there are any, compute their shards of
the same forward pass in step with it (kvflow/executor/multiproc.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.config import parse_dtype
from kvflow.engine.args import EngineArgs
from kvflow.layers.moe_placement import expert_placement
from kvflow.models.blocks import CausalLM
from kvflow.models.builder import KernelChoice, build_model
from kvflow.models.config import ModelConfig
from kvflow.models.loader import resolve_model_path
from kvflow.outputs import RunnerOutput, SchedulerOutput
from kvflow.quantization import quantization_config
from kvflow.quantization.int8 import Int8Config
from kvflow.spec_decode.proposer import Speculator
from kvflow.worker.model_runner import ModelRunner, StepInFlight


@dataclass(frozen=True)
class ModelSpec:
    """What a rank needs to build its part of the target model: plain data, so that a
    worker process can be sent it."""

    config: ModelConfig
    dtype: torch.dtype
    device: torch.device
    max_positions: int
    enforce_eager: bool = False
    batch_invariant: bool = False
    reserved_bytes: int = 0  # an explicit KV cache size, taken after the weights
    quantization: str | None = None
    quantization_group_size: int = 128
    quantize_lm_head: bool = False
    cpu_moe: bool = False
    n_cpu_moe: int | None = None

    @classmethod
    def from_args(cls, args: EngineArgs) -> ModelSpec:
        """The checkpoint found (or downloaded), its config read, the device and dtype
        resolved and max_model_len checked against the model's positions."""
        config = ModelConfig.from_pretrained(
            resolve_model_path(args.model, args.revision, args.download_dir))
        device = args.resolve_device()
        dtype = (config.default_dtype(device) if args.dtype == "auto"
                 else parse_dtype(args.dtype))
        model_len = config.max_position_embeddings
        if args.max_model_len is not None and args.max_model_len > model_len:
            raise ValueError(f"max_model_len={args.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({model_len})")
        return cls(config, dtype, device, args.max_model_len or model_len, args.enforce_eager,
                   args.batch_invariant, args.kv_cache_memory or 0, args.quantization,
                   args.quantization_group_size, args.quantize_lm_head, args.cpu_moe,
                   args.n_cpu_moe)

    def kernels(self) -> KernelChoice:
        return KernelChoice.for_device(self.device, self.dtype, self.enforce_eager,
                                       self.batch_invariant, self.reserved_bytes)

    def build(self, config: ModelConfig | None = None) -> CausalLM:
        """The model of `config` (a rank's shard of this spec's, or None: the whole)."""
        config = config or self.config
        placement = expert_placement(self.cpu_moe, self.n_cpu_moe, self.device,
                                     config.moe is not None)
        return build_model(config, self.dtype, self.device, self.max_positions, self.kernels(),
                           quantization_config(self.quantization, self.quantization_group_size),
                           lm_head_quant_config=Int8Config() if self.quantize_lm_head else None,
                           placement=placement)


def held_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """The bytes of a model's weights as this rank holds them (quantized ones at their own
    size): (all of them, the experts')."""
    from kvflow.layers.moe import FusedMoE

    def size(params) -> int:  # noqa: ANN001
        return sum(p.numel() * p.element_size() for p in params)

    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    return size(model.parameters()), size(p for m in experts for p in m.parameters())


@dataclass(frozen=True)
class RunnerSettings:
    """What the rank-0 runner needs beyond its model, once the KV cache is sized."""

    num_blocks: int
    block_size: int
    seed: int
    batch_invariant: bool
    # decode batch sizes to capture in CUDA graphs (empty: none), for contexts up to
    # max_model_len (kvflow/worker/cuda_graphs.py)
    graph_sizes: tuple[int, ...] = ()
    max_model_len: int = 0
    num_drafts: int = 0  # drafts a verification step takes at most (speculative decoding)


class Executor(ABC):
    """Builds the model on every rank (on construction), then, once the engine has sized the
    KV cache, each rank's cache and the rank-0 runner (`initialize`); then runs steps."""

    runner: ModelRunner  # rank 0's, in this process: it samples
    # steps submitted before the first is finished: one per pipeline stage
    max_in_flight: int = 1

    @property
    @abstractmethod
    def rank_config(self) -> ModelConfig:
        """The model as one rank holds it: its heads and widths, which size its KV cache."""

    @abstractmethod
    def initialize(self, settings: RunnerSettings, backend: AttentionBackend,
                   speculator: Speculator | None) -> None:
        ...

    def submit(self, scheduler_output: SchedulerOutput, previous: StepInFlight | None = None,
               sample: bool = False) -> StepInFlight | None:
        """Starts a step; finish them in the order they were submitted. previous, sample:
        async scheduling's (ModelRunner.submit)."""
        return self.runner.submit(scheduler_output, previous, sample)

    def finish(self, step: StepInFlight | None) -> RunnerOutput:
        return self.runner.finish(step)

    def held_bytes(self) -> tuple[int, int]:
        """The bytes of the weights every rank holds, summed: (all, the experts')."""
        return held_bytes(self.runner.model)

    def forget(self, req_ids: set[str]) -> None:
        self.runner.forget(req_ids)

    def wait_for_masks(self, timeout_s: float) -> None:
        self.runner.wait_for_masks(timeout_s)

    def shutdown(self) -> None:
        """Stops every rank's process; idempotent."""
