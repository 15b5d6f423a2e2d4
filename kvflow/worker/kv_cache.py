"""Sizing and allocating the paged KV cache.

Per layer, K and V each have the shape the attention backend asks for
(`AttentionBackend.kv_cache_shapes`: head-major blocks, with K d-major inside a block for
the native CPU backend), carved out of one allocation.
"""
from __future__ import annotations

import math
import os

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.models.config import ModelConfig
from kvflow.worker import huge_pages

CPU_KV_CAP = 4 * 2**30
CUDA_FREE_FRACTION = 0.8
# On the CPU, by default, room for this many sequences of max_model_len tokens (or many
# more shorter ones), as llama.cpp sizes its context from the model: a fixed budget put a
# 135M model at 5 GB resident and zeroed 4 GiB at every start.
CPU_FULL_SEQUENCES = 4


def available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_kv_cache_memory(device: torch.device, utilization: float | None = None,
                            bytes_per_token: int = 0, max_model_len: int = 0,
                            max_num_seqs: int = CPU_FULL_SEQUENCES) -> tuple[int, str]:
    """The KV budget in bytes, and how it was chosen (for the log and /load).

    With `utilization` (vLLM's gpu_memory_utilization): on CUDA, that fraction of the
    device's memory less what is already in use (the weights, and anything else on the
    device), as vLLM; on the CPU, that fraction of available memory.

    Without it: on CUDA, 80% of the memory free after the weights are loaded. On the CPU,
    enough for min(max_num_seqs, CPU_FULL_SEQUENCES) sequences of max_model_len tokens,
    at most the smaller of 4 GiB and a quarter of available memory (so that several
    engines in one process do not exhaust RAM)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if utilization is None:
            return int(free * CUDA_FREE_FRACTION), f"{CUDA_FREE_FRACTION:.0%} of free memory"
        budget = int(total * utilization) - (total - free)
        if budget <= 0:
            raise ValueError(f"gpu_memory_utilization={utilization} leaves no room for the KV "
                             f"cache: {(total - free) / 2**30:.2f} GiB of the device's "
                             f"{total / 2**30:.2f} GiB are in use already")
        return budget, f"gpu_memory_utilization={utilization}"
    if utilization is not None:
        return (int(available_host_memory() * utilization),
                f"gpu_memory_utilization={utilization} of available RAM")
    cap = min(CPU_KV_CAP, available_host_memory() // 4)
    sequences = max(1, min(max_num_seqs, CPU_FULL_SEQUENCES))
    wanted = bytes_per_token * max_model_len * sequences
    if not wanted or wanted > cap:
        return cap, "min(4 GiB, 1/4 of available RAM)"
    return wanted, f"{sequences} sequences of max_model_len={max_model_len}"


def num_blocks_for(memory: int, config: ModelConfig, dtype: torch.dtype, block_size: int) -> int:
    return memory // (config.kv_bytes_per_token(dtype) * block_size)


def allocate_kv_cache(config: ModelConfig, backend: AttentionBackend, num_blocks: int,
                      block_size: int, dtype: torch.dtype,
                      device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    k_shape, v_shape = backend.kv_cache_shapes(num_blocks, config.num_kv_heads, block_size,
                                               config.head_dim)
    numel = math.prod(k_shape)
    assert numel == math.prod(v_shape), "K and V caches must be the same size"
    layers = len(config.held_layers)
    cache = torch.empty((layers, 2, numel), dtype=dtype, device=device)
    huge_pages.advise([cache])  # before zeroing it faults every page in
    cache.zero_()
    huge_pages.collapse([cache])  # what faulted in small (memory too fragmented then)
    return [(cache[layer, 0].view(k_shape), cache[layer, 1].view(v_shape))
            for layer in range(layers)]
