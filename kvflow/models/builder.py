"""One way to make a runnable model, for the engine's target and a speculative draft alike:
weights (with quantization at load), the kernels fitted to this machine, and the model's
attention layers bound to their KV cache."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.kernels.triton_ops import glue_ops
from kvflow.kernels.tuning import (attach_glue, install_batch_invariant_kernels,
                                   install_native_kernels, install_quantized_kernels,
                                   native_cpu_ops)
from kvflow.layers.moe_placement import ExpertPlacement
from kvflow.models.blocks import CausalLM, SparseMoeBlock
from kvflow.models.config import ModelConfig
from kvflow.models.loader import load_model
from kvflow.quantization.base import QuantizationConfig
from kvflow.worker import huge_pages
from kvflow.worker.kv_cache import allocate_kv_cache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelChoice:
    """Which kernels models of this engine run: the native CPU kernels (`native_ops`,
    None: PyTorch's), fitted by measuring or batch-invariant, or PyTorch's alone; on
    CUDA, Triton's glue kernels (`glue_ops`) for norms, activations and RoPE."""

    native_ops: ModuleType | None
    batch_invariant: bool = False
    enforce_eager: bool = False
    reserved_bytes: int = 0  # memory taken after the models (an explicit KV size)
    glue_ops: ModuleType | None = None

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype, enforce_eager: bool,
                   batch_invariant: bool, reserved_bytes: int) -> KernelChoice:
        ops = native_cpu_ops(device, dtype, enforce_eager)
        if batch_invariant and ops is None:
            raise ValueError("batch_invariant needs kvflow's native CPU kernels: the CPU "
                             f"(not {device.type}), float32 or bfloat16 (not {dtype}) and "
                             "a kernel build that works here (see the log)")
        return cls(ops, batch_invariant, enforce_eager, reserved_bytes,
                   glue_ops(device, dtype, enforce_eager))


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int, kernels: KernelChoice,
                quant_config: QuantizationConfig | None = None,
                lm_head_quant_config: QuantizationConfig | None = None,
                placement: ExpertPlacement | None = None) -> CausalLM:
    """The model with its weights loaded and its kernels installed. placement: expert layers
    kept on the host CPU (kvflow/layers/moe_placement.py), which take the CPU's kernels."""
    model = load_model(config, dtype, device, max_positions, quant_config,
                       lm_head_quant_config, placement)
    if kernels.batch_invariant:
        install_batch_invariant_kernels(model, kernels.native_ops)
    elif kernels.native_ops is not None:
        install_native_kernels(model, kernels.native_ops, kernels.reserved_bytes)
    elif not kernels.enforce_eager:
        install_quantized_kernels(model)
        if kernels.glue_ops is not None:
            attach_glue(model, kernels.glue_ops)
    host_ops = (native_cpu_ops(placement.device, dtype, kernels.enforce_eager)
                if placement is not None and device != placement.device else None)
    if host_ops is not None:
        for block in model.modules():
            if isinstance(block, SparseMoeBlock) and block.host is not None:
                install_native_kernels(block.experts, host_ops, kernels.reserved_bytes)
    # The parameters were gathered onto huge pages before they were loaded; the kernels'
    # copies made since are moved now.
    huge_pages.collapse_logged(huge_pages.tensors_of(model), "weights")
    return model


def bind_kv_cache(model: CausalLM, config: ModelConfig, backend: AttentionBackend,
                  num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Allocate the model's KV cache in the backend's layout and bind each attention layer
    to its part."""
    caches = allocate_kv_cache(config, backend, num_blocks, block_size, dtype, device)
    for layer, (k_cache, v_cache) in zip(model.attention_layers(), caches, strict=True):
        layer.bind(backend, k_cache, v_cache)
    return caches
