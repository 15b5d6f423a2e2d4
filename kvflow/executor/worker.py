"""A tensor-parallel rank other than 0, in a process of its own: it builds its shard of the
model and of the KV cache, then follows rank 0's messages, computing its part of every
forward pass and of every logits product (the collectives in them keep the ranks in
step). It holds no request state: scheduling and sampling are rank 0's.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvflow.attention.metadata import AttentionMetadata
from kvflow.attention.selector import select_backend
from kvflow.distributed.comm import Communicator, WorkerFailedError
from kvflow.distributed.group import ParallelConfig, connect, open_store
from kvflow.distributed.tensor_parallel import TensorParallel, building, shard_config
from kvflow.executor.base import ModelSpec
from kvflow.models.builder import bind_kv_cache

logger = logging.getLogger("kvflow.executor.worker")  # not __main__ when run with -m

# rank 0's messages: (FORWARD, input_ids, metadata), (LOGITS, rows), (KV_CACHE, blocks,
# block size, backend name), (STOP,)
FORWARD, LOGITS, KV_CACHE, STOP = "forward", "logits", "kv_cache", "stop"
PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class WorkerSpec:
    model: ModelSpec
    parallel: ParallelConfig
    rank: int
    threads: int
    cores: tuple[int, ...] | None  # the CPUs its threads are bound to (None: any)
    shm_path: str | None
    log_level: int = logging.INFO


def to_plain(value: Any) -> Any:
    """A step's tensors as numpy arrays, metadata as a dict of them: what pickles in
    microseconds (a tensor pickles through torch's serializer, ~0.1 ms each)."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, AttentionMetadata):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def from_plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return AttentionMetadata(**{name: from_plain(v) for name, v in value.items()})
    return value


def _exit_with_parent(parent: int) -> None:
    """Ends this process once the process that started it is gone, however it went (prctl's
    PDEATHSIG would fire when the starting *thread* exits: a server loads on a thread)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="kvflow-parent-watch", daemon=True).start()


def run_worker(spec: WorkerSpec) -> None:
    """The process's entry point."""
    logging.basicConfig(level=spec.log_level, stream=sys.stderr,
                        format=f"%(asctime)s rank {spec.rank} %(levelname)s %(name)s: "
                               "%(message)s")
    if spec.cores is not None:
        os.sched_setaffinity(0, spec.cores)
    torch.set_num_threads(spec.threads)
    parent = os.getppid()
    _exit_with_parent(parent)

    def liveness() -> str | None:
        return None if os.getppid() == parent else "rank 0's process has exited"

    store = open_store(spec.parallel, spec.rank)
    try:
        comm = connect(store, spec.parallel, spec.rank, liveness,
                       Path(spec.shm_path) if spec.shm_path else None,
                       spec.model.config.hidden_size, spec.model.dtype)
        _serve(spec, comm)
    except WorkerFailedError as exc:
        logger.error("rank %d stops: %s", spec.rank, exc)
        _exit(1)
    except BaseException as exc:
        # Rank 0 reads why from the store when it finds this process gone.
        store.set(f"failed/{spec.rank}", f"{type(exc).__name__}: {exc}"[:2000])
        logger.exception("rank %d failed", spec.rank)
        _exit(1)
    _exit(0)


def _exit(code: int) -> None:
    """Exits without running destructors: gloo's process group, torn down at interpreter
    exit while its threads still run, can abort the process (std::terminate, SIGABRT),
    which turned a clean stop into a crash on a busy machine."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@torch.inference_mode()
def _serve(spec: WorkerSpec, comm: Communicator) -> None:
    size = spec.parallel.tensor_parallel_size
    config = shard_config(spec.model.config, size)
    with building(TensorParallel(spec.rank, size, comm)):
        model = spec.model.build(config)
    kind, num_blocks, block_size, backend_name = comm.broadcast()
    assert kind == KV_CACHE, f"rank {spec.rank} expected the KV cache's size, got {kind}"
    kernels = spec.model.kernels()
    backend = select_backend(backend_name, spec.model.device, kernels.native_ops,
                             spec.model.batch_invariant)
    bind_kv_cache(model, config, backend, num_blocks, block_size, spec.model.dtype,
                  spec.model.device)
    logger.info("rank %d ready: %d KV blocks", spec.rank, num_blocks)
    hidden = None
    while True:
        message = comm.broadcast()
        if message[0] == FORWARD:
            hidden = model(from_plain(message[1]), from_plain(message[2]))
        elif message[0] == LOGITS:
            model.logits_at(hidden, from_plain(message[1]))
        elif message[0] == STOP:
            comm.close()
            return
        else:
            raise ValueError(f"rank {spec.rank} got an unknown message {message[0]!r}")


if __name__ == "__main__":
    run_worker(pickle.load(sys.stdin.buffer))
