"""Tensor-parallel ranks in processes of their own, rank 0 in the engine's.

Rank 0 runs the runner as a single rank would (sampling, grammar masks and the speculator
stay beside the scheduler, as vLLM's driver worker did), over its shard of the model;
before each forward pass and each logits product it broadcasts what the other ranks need
to compute theirs (the token ids and the attention metadata, as plain data), and the
collectives inside the pass keep every rank in step. Sampled tokens never leave rank 0.

The ranks on this machine are started here; ranks on other machines are started there
with `kvflow serve ... --headless` and join through the rendezvous at master_addr.
A rank that dies, hangs past the timeout or fails to join raises WorkerFailedError, which
ends the engine; the processes started here are stopped with it.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import weakref
from dataclasses import replace

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.attention.metadata import AttentionMetadata
from kvflow.distributed.comm import (Communicator, ShmCommunicator, WorkerFailedError,
                                     shared_memory_works)
from kvflow.distributed.group import ParallelConfig, connect, open_store
from kvflow.distributed.tensor_parallel import TensorParallel, building, shard_config
from kvflow.executor.base import Executor, ModelSpec, RunnerSettings
from kvflow.executor.worker import FORWARD, KV_CACHE, LOGITS, STOP, WorkerSpec, to_plain
from kvflow.models.blocks import CausalLM
from kvflow.models.config import ModelConfig
from kvflow.outputs import RunnerOutput, SchedulerOutput
from kvflow.spec_decode.proposer import Speculator
from kvflow.worker.model_runner import ModelRunner
from kvflow.worker.threads import default_num_threads

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0


class RankZeroModel:
    """Rank 0's shard, announcing each forward pass and logits product to the other ranks
    before it runs its own part. A failure inside either leaves the ranks out of step (the
    others wait in a collective rank 0 never reaches), so it ends the engine."""

    def __init__(self, model: CausalLM, comm: Communicator) -> None:
        self.model = model
        self.comm = comm

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.comm.broadcast((FORWARD, to_plain(input_ids), to_plain(meta)))
        return self._in_step(self.model, input_ids, meta)

    def logits_at(self, hidden: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        self.comm.broadcast((LOGITS, to_plain(rows)))
        return self._in_step(self.model.logits_at, hidden, rows)

    @staticmethod
    def _in_step(fn, *args):  # noqa: ANN001, ANN205
        try:
            return fn(*args)
        except WorkerFailedError:
            raise
        except Exception as exc:
            raise WorkerFailedError(f"rank 0 failed inside a sharded pass, which leaves the "
                                    f"ranks out of step: {type(exc).__name__}: {exc}") from exc

    def __getattr__(self, name: str):  # noqa: ANN204 - the model's other attributes
        return getattr(self.model, name)


def start_worker(spec: WorkerSpec) -> subprocess.Popen:
    """A worker rank in a fresh interpreter (`python -m kvflow.executor.worker`, its spec
    on stdin): unlike multiprocessing's spawn, it never imports the caller's __main__,
    so a script need not guard its LLM(...) call."""
    process = subprocess.Popen([sys.executable, "-m", "kvflow.executor.worker"],
                               stdin=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(pickle.dumps(spec))
    process.stdin.close()
    return process


def stop_workers(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.send_signal(signal.SIGCONT)  # a stopped (hung) rank, so that it ends
    for process in processes:
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_GRACE_S)


def rank_threads(parallel: ParallelConfig) -> int | None:
    """Each rank's default thread count: this machine's cores shared among its ranks (None:
    one rank, which takes worker/threads.py's default)."""
    if parallel.world_size == 1:
        return None
    return max(1, default_num_threads() // parallel.ranks_per_node)


def core_lists(ranks: int, threads: int) -> list[tuple[int, ...] | None]:
    """Each local rank's CPUs, `threads` each, where this process may use enough of them;
    else None (unbound)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < ranks * threads:
        return [None] * ranks
    return [tuple(cpus[i * threads:(i + 1) * threads]) for i in range(ranks)]


class MultiprocExecutor(Executor):
    def __init__(self, spec: ModelSpec, parallel: ParallelConfig, threads: int) -> None:
        if spec.device.type != "cpu":
            raise ValueError(f"tensor_parallel_size={parallel.tensor_parallel_size} on "
                             f"{spec.device.type}: kvflow splits models across CPU ranks "
                             "(gloo) only; NCCL ranks on GPUs are not built yet")
        self.spec = spec
        size = parallel.world_size
        self._rank_config = shard_config(spec.config, size)
        self.failure: str | None = None
        self.store = open_store(parallel, 0)
        self.parallel = parallel = replace(parallel, master_port=self.store.port)
        shm_path = (ShmCommunicator.create(size)
                    if parallel.nnodes == 1 and shared_memory_works() else None)
        cores = core_lists(parallel.ranks_per_node, threads)
        self._pinned: tuple[int, set[int]] | None = None
        if cores[0] is not None:
            # Rank 0's own cores, for this thread and the threads it starts (the engine
            # loop's, the kernels' pool): left free to move, the OS puts it on the other
            # ranks' cores at times, and every rank waits for the one it slowed. Given
            # back at shutdown, when that runs on this thread.
            self._pinned = (threading.get_ident(), os.sched_getaffinity(0))
            os.sched_setaffinity(0, cores[0])
        self.workers: dict[int, subprocess.Popen] = {}
        started: list[subprocess.Popen] = []  # stopped with this executor, however it ends
        self._finalizer = weakref.finalize(self, stop_workers, started)
        try:
            for local, rank in enumerate(parallel.local_ranks):
                if rank == 0:
                    continue
                worker = WorkerSpec(spec, parallel, rank, threads, cores[local],
                                    None if shm_path is None else str(shm_path),
                                    logging.getLogger("kvflow").getEffectiveLevel())
                process = start_worker(worker)
                started.append(process)
                self.workers[rank] = process
            logger.info("tensor parallel: %d ranks, %d on this machine (pids %s), %d "
                        "thread(s) each", size, parallel.ranks_per_node,
                        ", ".join(str(p.pid) for p in self.workers.values()) or "-", threads)
            self.comm = connect(self.store, parallel, 0, self.liveness, shm_path,
                                spec.config.hidden_size, spec.dtype)
            with building(TensorParallel(0, size, self.comm)):
                self._model = spec.build(self._rank_config)
        except BaseException:
            self.shutdown()
            raise
        finally:
            if shm_path is not None:  # every local rank has mapped it by now, or failed
                shm_path.unlink(missing_ok=True)

    @property
    def rank_config(self) -> ModelConfig:
        return self._rank_config

    @property
    def pids(self) -> dict[int, int]:
        """Each local worker rank's process id."""
        return {rank: process.pid for rank, process in self.workers.items()}

    def liveness(self) -> str | None:
        """None while every rank runs, else which one stopped and why: a local rank's
        exit, or the error any rank wrote to the store before it stopped."""
        for rank in range(1, self.parallel.world_size):
            process = self.workers.get(rank)
            exited = process is not None and process.poll() is not None
            why = (self.store.get(f"failed/{rank}").decode()
                   if (exited or process is None) and self.store.check([f"failed/{rank}"])
                   else None)
            if exited:
                return (f"rank {rank} (pid {process.pid}) exited with code "
                        f"{process.returncode}" + (f": {why}" if why else ""))
            if why is not None:
                return f"rank {rank} failed: {why}"
        return None

    def initialize(self, settings: RunnerSettings, backend: AttentionBackend,
                   speculator: Speculator | None) -> None:
        self.comm.broadcast((KV_CACHE, settings.num_blocks, settings.block_size, backend.name))
        self.runner = ModelRunner(RankZeroModel(self._model, self.comm),  # type: ignore[arg-type]
                                  self.spec.config, backend, settings.num_blocks,
                                  settings.block_size, self.spec.dtype, self.spec.device,
                                  settings.seed, speculator, settings.batch_invariant,
                                  kv_config=self._rank_config)

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.check_health()
        try:
            return self.runner.execute(scheduler_output)
        except WorkerFailedError as exc:
            self._fail(str(exc))
            raise

    def check_health(self) -> None:
        if self.failure is None:
            reason = self.liveness()
            if reason is not None:
                self._fail(reason)
        if self.failure is not None:
            raise WorkerFailedError(self.failure)

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            logger.error("tensor-parallel engine stops: %s", reason)
            self.shutdown()

    def shutdown(self) -> None:
        comm = getattr(self, "comm", None)
        if comm is not None and self.failure is None and hasattr(self, "runner"):
            # Healthy ranks end cleanly (a headless machine's exit with 0); ranks on this
            # machine are stopped below in any case.
            self.failure = "the engine has shut down"
            if isinstance(comm, ShmCommunicator):  # not the startup-sized wait for acks
                comm.timeout_s = STOP_GRACE_S
            try:
                comm.broadcast((STOP,))
            except WorkerFailedError:
                pass
        self._finalizer()
        if self._pinned is not None and self._pinned[0] == threading.get_ident():
            os.sched_setaffinity(0, self._pinned[1])
            self._pinned = None
        if comm is not None:
            comm.close()
