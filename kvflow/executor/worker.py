"""A rank other than 0, in a process of its own: it builds its part of the model (its
tensor-parallel shard of its pipeline stage's layers) and of the KV cache, then follows
the step messages: from rank 0 on the first stage, from its peer in the stage before on
the others. It computes its part of every forward pass (the collectives in it keep a
stage's ranks in step), hands the next stage its hidden states, and on the last stage
computes the logits, which its first rank sends back to rank 0. It holds no request
state: scheduling and sampling are rank 0's.
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
import torch.distributed as dist

from kvflow.attention.metadata import AttentionMetadata
from kvflow.attention.selector import select_backend
from kvflow.distributed.comm import WorkerFailedError
from kvflow.distributed.group import Links, ParallelConfig, connect, open_store
from kvflow.distributed.pipeline import Carry
from kvflow.distributed.tensor_parallel import TensorParallel, building
from kvflow.executor.base import ModelSpec, held_bytes
from kvflow.models.builder import bind_kv_cache
from kvflow.worker.host_memory import keep_freed_blocks

logger = logging.getLogger("kvflow.executor.worker")  # not __main__ when run with -m

# the step messages: (FORWARD, input_ids (None after the first stage, which sends its hidden
# states with it), metadata, rows whose logits the step needs), (KV_CACHE, blocks, block
# size, backend name), (STOP,)
FORWARD, KV_CACHE, STOP = "forward", "kv_cache", "stop"
HELD_BYTES = "held_bytes"  # the store key prefix under which each rank reports its weights' bytes
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
    if spec.model.device.type == "cpu":
        keep_freed_blocks()
    parent = os.getppid()
    _exit_with_parent(parent)

    def liveness() -> str | None:
        return None if os.getppid() == parent else "rank 0's process has exited"

    store = open_store(spec.parallel, spec.rank)
    try:
        links = connect(store, spec.parallel, spec.rank, liveness,
                        Path(spec.shm_path) if spec.shm_path else None,
                        spec.model.config.hidden_size, spec.model.dtype)
        _serve(spec, links, store)
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
def _serve(spec: WorkerSpec, links: Links, store: dist.TCPStore) -> None:
    parallel, rank = spec.parallel, spec.rank
    stage, tp_rank = parallel.stage_of(rank), parallel.tp_rank_of(rank)
    last = stage == parallel.pipeline_parallel_size - 1
    config = parallel.model_config(spec.model.config, rank)
    with building(TensorParallel(tp_rank, parallel.tensor_parallel_size, links.tp)):
        model = spec.model.build(config)
    store.set(f"{HELD_BYTES}/{rank}", " ".join(map(str, held_bytes(model))))
    previous = parallel.rank_of(stage - 1, tp_rank)
    following = parallel.rank_of(stage + 1, tp_rank)

    def next_message() -> tuple[tuple, list[torch.Tensor]]:
        if stage == 0:
            return links.tp.broadcast(), []
        return links.pipe.recv(previous, "waiting for a step message", idle=True)

    message, _ = next_message()
    assert message[0] == KV_CACHE, f"rank {rank} expected the KV cache's size, got {message[0]}"
    _, num_blocks, block_size, backend_name = message
    if not last:
        links.pipe.send(following, message, [])
    kernels = spec.model.kernels()
    backend = select_backend(backend_name, spec.model.device, kernels.native_ops,
                             spec.model.batch_invariant, spec.model.dtype)
    bind_kv_cache(model, config, backend, num_blocks, block_size, spec.model.dtype,
                  spec.model.device)
    logger.info("rank %d (stage %d, layers %d-%d) ready: %d KV blocks", rank, stage,
                config.held_layers.start, config.held_layers.stop - 1, num_blocks)
    while True:
        message, tensors = next_message()
        if message[0] == FORWARD:
            _, input_ids, meta, rows = message
            meta = from_plain(meta)
            carry = Carry(*tensors) if tensors else None
            out = model(None if input_ids is None else from_plain(input_ids), meta, carry)
            if not last:
                links.pipe.send(following, (FORWARD, None, message[2], rows),
                                [out.hidden, out.residual])
                continue
            logits = model.logits_at(out, from_plain(rows))
            if links.pipe is not None and tp_rank == 0:
                links.pipe.send(0, None, [logits])
        elif message[0] == STOP:
            if not last:
                links.pipe.send(following, message, [])
            if links.pipe is not None:
                links.pipe.flush()
            links.close()
            return
        else:
            raise ValueError(f"rank {rank} got an unknown message {message[0]!r}")


if __name__ == "__main__":
    run_worker(pickle.load(sys.stdin.buffer))
