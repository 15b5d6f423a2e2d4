"""Ranks finding each other, as torchrun and SGLang do: rank 0 holds a TCPStore at
master_addr:master_port and every rank connects to it. Rank r is tensor-parallel rank
r % tp of pipeline stage r // tp (a machine of tp ranks holds one stage). Each stage's
ranks share a gloo process group for their collectives, or, where they are on one
machine, a shared-memory communicator where that measures faster; the stages pass
messages to one another through a `Pipe` (kvflow/distributed/pipe.py).
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
from kvflow.distributed.pipe import Pipe
from kvflow.distributed.pipeline import stage_config
from kvflow.distributed.tensor_parallel import shard_config
from kvflow.models.config import ModelConfig

logger = logging.getLogger(__name__)

JOIN_POLL_S = 0.05
# Waits for work (a step message, a pipeline stage's next batch) have no deadline: the
# liveness checks find a peer that stopped.
NO_DEADLINE = timedelta(days=365)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, on one machine
    timeout_s: float = 300.0  # for a rank to join, and for any collective

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got "
                             f"{self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be at least 1, got "
                             f"{self.pipeline_parallel_size}")
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
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def stage_of(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tensor_parallel_size

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tensor_parallel_size + tp_rank

    def model_config(self, config: ModelConfig, rank: int) -> ModelConfig:
        """The model as `rank` holds it: its tensor-parallel shard of its stage's layers."""
        return stage_config(shard_config(config, self.tensor_parallel_size),
                            self.pipeline_parallel_size, self.stage_of(rank))

    def pipe_sources(self, rank: int) -> list[int]:
        """The ranks `rank` receives pipeline messages from: its peer in the stage before,
        and, for rank 0, the last stage's first rank, which returns the logits."""
        stage, tp_rank = self.stage_of(rank), self.tp_rank_of(rank)
        sources = [self.rank_of(stage - 1, tp_rank)] if stage > 0 else []
        if rank == 0:
            sources.append(self.rank_of(self.pipeline_parallel_size - 1, 0))
        return sources

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


@dataclass
class Links:
    """A rank's ways to the others."""

    tp: Communicator | None  # its stage's tensor-parallel group (None: alone in it)
    pipe: Pipe | None  # to and from the other stages (None: one stage)

    def set_timeout(self, seconds: float) -> None:
        """How long a send or a collective waits for the other ranks from now on."""
        for link in (self.tp, self.pipe):
            if link is not None:
                link.timeout_s = seconds

    def close(self) -> None:
        if self.tp is not None:
            self.tp.close()


def _gloo(store: dist.TCPStore, prefix: str, rank: int, size: int, timeout: timedelta,
          liveness: Liveness) -> dist.ProcessGroupGloo:
    try:
        return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, timeout)
    except RuntimeError as exc:
        raise WorkerFailedError(f"rank {rank} could not join the process group {prefix}: "
                                f"{liveness() or exc}") from exc


def connect(store: dist.TCPStore, parallel: ParallelConfig, rank: int, liveness: Liveness,
            shm_path: Path | None, hidden_size: int, dtype: torch.dtype) -> Links:
    """Every rank calls it once its store is open. shm_path: the shared-memory file of this
    rank's stage, where its ranks share a machine."""
    store.set(f"joined/{rank}", "1")
    if rank == 0:
        wait_for_ranks(store, parallel, liveness)
    tp = None
    if parallel.tensor_parallel_size > 1:
        tp = _stage_group(store, parallel, rank, liveness, shm_path, hidden_size, dtype)
    pipe = None
    if parallel.pipeline_parallel_size > 1:
        group = _gloo(store, "pipe", rank, parallel.world_size, NO_DEADLINE, liveness)
        pipe = Pipe(group, rank, parallel.pipe_sources(rank), liveness, parallel.timeout_s)
    return Links(tp, pipe)


def _stage_group(store: dist.TCPStore, parallel: ParallelConfig, rank: int,
                 liveness: Liveness, shm_path: Path | None, hidden_size: int,
                 dtype: torch.dtype) -> Communicator:
    """The tensor-parallel group of rank's stage: gloo, or (shm_path given) the shared-memory
    communicator if it measures faster."""
    stage, tp_rank, size = (parallel.stage_of(rank), parallel.tp_rank_of(rank),
                            parallel.tensor_parallel_size)
    prefix = f"gloo/stage{stage}"
    gloo = GlooCommunicator(
        _gloo(store, prefix, tp_rank, size, timedelta(seconds=parallel.timeout_s), liveness),
        _gloo(store, f"{prefix}/messages", tp_rank, size, NO_DEADLINE, liveness),
        tp_rank, size, liveness, parallel.timeout_s)
    if shm_path is None:
        return gloo
    shm = ShmCommunicator(shm_path, tp_rank, size, gloo, liveness, parallel.timeout_s)
    gloo_s = time_all_reduce(gloo, hidden_size, dtype)
    shm_s = time_all_reduce(shm, hidden_size, dtype)
    use_shm = gloo.broadcast(shm_s < gloo_s if tp_rank == 0 else None)
    if tp_rank == 0:
        logger.info("stage %d: all-reduce of %d %s values between %d ranks: gloo %.0f us, "
                    "shared memory %.0f us; using %s", stage, hidden_size,
                    str(dtype).removeprefix("torch."), size, gloo_s * 1e6, shm_s * 1e6,
                    "shared memory" if use_shm else "gloo")
    comm = shm if use_shm else gloo
    comm.timings.update({"gloo": gloo_s, "shared memory": shm_s})
    if not use_shm:
        shm.close()
    return comm
