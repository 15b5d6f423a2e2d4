"""Sizing and allocating the paged KV cache.

Per layer, K and V are [num_blocks, num_kv_heads, block_size, head_dim]: head-major
inside a block, so one head's keys for a block are contiguous.
"""
from __future__ import annotations

import os

import torch

from kvflow.config import ModelConfig

CPU_KV_CAP = 4 * 2**30
CUDA_FREE_FRACTION = 0.8


def available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_kv_cache_memory(device: torch.device) -> int:
    """On CUDA, 80% of the memory free after the weights are loaded; on the CPU the
    smaller of 4 GiB and a quarter of available memory, so that several engines in one
    process do not exhaust RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return min(CPU_KV_CAP, available_host_memory() // 4)


def num_blocks_for(memory: int, config: ModelConfig, dtype: torch.dtype, block_size: int) -> int:
    return memory // (config.kv_bytes_per_token(dtype) * block_size)


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (config.num_layers, 2, num_blocks, config.num_kv_heads, block_size, config.head_dim)
    cache = torch.zeros(shape, dtype=dtype, device=device)
    return [(cache[layer, 0], cache[layer, 1]) for layer in range(config.num_layers)]
