"""Ranks finding each other, as torchrun and SGLang do: rank 0 holds a TCPStore at
master_addr:master_port, every rank connects to it, and one gloo process group spans
them. Where every rank is on one machine, a shared-memory communicator is measured
against gloo and the faster one is used.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from kvflow.distributed.comm import (Communicator, GlooCommunicator, Liveness, ShmCommunicator,
                                     WorkerFailedError, time_all_reduce)

logger = logging.getLogger(__name__)

JOIN_POLL_S = 0.05


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, on one machine
    timeout_s: float = 300.0  # for a rank to join, and for any collective

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got "
                             f"{self.tensor_parallel_size}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes), got node_rank="
                             f"{self.node_rank} with nnodes={self.nnodes}")
        if self.world_size % self.nnodes:
            raise ValueError(f"{self.world_size} ranks do not divide evenly among "
                             f"nnodes={self.nnodes} machines")
        if self.nnodes > 1 and not self.master_port:
            raise ValueError("a launch over several machines needs --master-addr and "
                             "--master-port, the same on every machine")
        if self.timeout_s <= 0:
            raise ValueError(f"distributed_timeout must be positive, got {self.timeout_s}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def local_ranks(self) -> range:
        first = self.node_rank * self.ranks_per_node
        return range(first, first + self.ranks_per_node)


def open_store(parallel: ParallelConfig, rank: int) -> dist.TCPStore:
    """Rank 0 serves the store; the others connect to it (retrying until timeout_s)."""
    timeout = timedelta(seconds=parallel.timeout_s)
    try:
        return dist.TCPStore(parallel.master_addr, parallel.master_port, parallel.world_size,
                             is_master=rank == 0, wait_for_workers=False, timeout=timeout)
    except (RuntimeError, OSError) as exc:
        where = f"{parallel.master_addr}:{parallel.master_port}"
        raise WorkerFailedError(f"rank {rank} could not {'serve' if rank == 0 else 'reach'} "
                                f"the rendezvous at {where}: {exc}") from exc


def wait_for_ranks(store: dist.TCPStore, parallel: ParallelConfig, liveness: Liveness) -> None:
    """On rank 0: until every rank has joined, a local one has died, or timeout_s."""
    deadline = time.monotonic() + parallel.timeout_s
    missing = list(range(1, parallel.world_size))
    while missing:
        missing = [r for r in missing if not store.check([f"joined/{r}"])]
        reason = liveness()
        if reason is not None:
            raise WorkerFailedError(f"startup failed: {reason}")
        if missing and time.monotonic() > deadline:
            raise WorkerFailedError(
                f"startup failed: rank(s) {', '.join(map(str, missing))} did not join within "
                f"{parallel.timeout_s:g} s (on a machine of its own, a rank is started with "
                "--headless and the same --master-addr, --master-port and --nnodes)")
        time.sleep(JOIN_POLL_S)


def connect(store: dist.TCPStore, parallel: ParallelConfig, rank: int, liveness: Liveness,
            shm_path: Path | None, hidden_size: int, dtype: torch.dtype) -> Communicator:
    """Every rank calls it once its store is open: the gloo group, and on one machine
    (shm_path given) the shared-memory communicator if it measures faster."""
    store.set(f"joined/{rank}", "1")
    if rank == 0:
        wait_for_ranks(store, parallel, liveness)
    try:
        group = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank,
                                      parallel.world_size,
                                      timedelta(seconds=parallel.timeout_s))
    except RuntimeError as exc:
        raise WorkerFailedError(f"rank {rank} could not join the process group: "
                                f"{liveness() or exc}") from exc
    gloo = GlooCommunicator(group, rank, parallel.world_size, liveness)
    if shm_path is None:
        return gloo
    shm = ShmCommunicator(shm_path, rank, parallel.world_size, gloo, liveness,
                          parallel.timeout_s)
    gloo_s = time_all_reduce(gloo, hidden_size, dtype)
    shm_s = time_all_reduce(shm, hidden_size, dtype)
    use_shm = gloo.broadcast(shm_s < gloo_s if rank == 0 else None)
    if rank == 0:
        logger.info("all-reduce of %d %s values between %d ranks: gloo %.0f us, shared "
                    "memory %.0f us; using %s", hidden_size, str(dtype).removeprefix("torch."),
                    parallel.world_size, gloo_s * 1e6, shm_s * 1e6,
                    "shared memory" if use_shm else "gloo")
    comm = shm if use_shm else gloo
    comm.timings.update({"gloo": gloo_s, "shared memory": shm_s})
    if not use_shm:
        shm.close()
    return comm
