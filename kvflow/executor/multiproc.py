"""Ranks in processes of their own, rank 0 in the engine's: tensor parallelism within
each pipeline stage, the stages one after another.

Rank 0 runs the runner as a single rank would (sampling, grammar masks and the speculator
stay beside the scheduler, as vLLM's driver worker did) over its part of the model (its
shard of the first stage's layers). Before each forward pass it broadcasts what the other
ranks of its stage need (the token ids, the attention metadata and the rows whose logits
the step needs, as plain data), and the collectives inside the pass keep them in step.
Each stage hands the next its hidden states with the same message; the last stage
computes the logits and its first rank sends them back to rank 0. Sampled tokens never
leave rank 0. A pipeline's first stage returns as soon as it has sent its batch on, so
that the engine can start the next batch while the later stages work on this one
(`max_in_flight`: one batch per stage).

The ranks on this machine are started here; ranks on other machines are started there
with `kvflow serve ... --headless` and join through the rendezvous at master_addr.
A rank that dies, hangs past the timeout or fails to join raises WorkerFailedError, which
ends the engine; the processes started here are stopped with it.
"""
from __future__ import annotations

import functools
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import replace

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.attention.metadata import AttentionMetadata
from kvflow.distributed.comm import ShmCommunicator, WorkerFailedError, shared_memory_works
from kvflow.distributed.group import Links, ParallelConfig, connect, open_store
from kvflow.distributed.tensor_parallel import TensorParallel, building
from kvflow.executor.base import Executor, ModelSpec, RunnerSettings
from kvflow.executor.worker import FORWARD, HELD_BYTES, KV_CACHE, STOP, WorkerSpec, to_plain
from kvflow.models.blocks import CausalLM
from kvflow.models.config import ModelConfig
from kvflow.outputs import RunnerOutput, SchedulerOutput
from kvflow.spec_decode.proposer import Speculator
from kvflow.worker.model_runner import ModelRunner, StepInFlight
from kvflow.worker.threads import default_num_threads

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0


class RankZeroStage:
    """Rank 0's part of the model, announcing each step to the ranks that follow it before
    it runs its own part. A failure inside a stage's tensor-parallel pass leaves its ranks
    out of step (the others wait in a collective rank 0 never reaches), so it ends the
    engine."""

    def __init__(self, model: CausalLM, links: Links, parallel: ParallelConfig) -> None:
        self.model = model
        self.links = links
        self.next_rank = parallel.rank_of(1, 0)
        self.last_rank = parallel.rank_of(parallel.pipeline_parallel_size - 1, 0)

    def announce(self, message: tuple, tensors: list[torch.Tensor] | None = None) -> None:
        """To the other ranks of stage 0 and, where there is one, the next stage (with
        `tensors`, which stage 0 computed)."""
        if self.links.tp is not None:
            self.links.tp.broadcast(message)
        if self.links.pipe is not None and tensors is not None:
            self.links.pipe.send(self.next_rank, message, tensors)

    def start_step(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                   rows: torch.Tensor) -> Callable[[], torch.Tensor]:
        message = (FORWARD, to_plain(input_ids), to_plain(meta), to_plain(rows))
        self.announce(message)  # the next stage's message waits for this stage's output
        out = self._in_step(self.model, input_ids, meta)
        pipe = self.links.pipe
        if pipe is None:
            logits = self._in_step(self.model.logits_at, out, rows)
            return lambda: logits
        pipe.send(self.next_rank, (FORWARD, None, *message[2:]), [out.hidden, out.residual])
        return lambda: pipe.recv(self.last_rank, "a pipeline step")[1][0]

    def _in_step(self, fn, *args):  # noqa: ANN001, ANN202
        if self.links.tp is None:  # no collective to fall out of: an ordinary step failure
            return fn(*args)
        try:
            return fn(*args)
        except WorkerFailedError:
            raise
        except Exception as exc:
            raise WorkerFailedError(f"rank 0 failed inside a sharded pass, which leaves the "
                                    f"ranks out of step: {type(exc).__name__}: {exc}") from exc

    def __getattr__(self, name: str):  # noqa: ANN204 - the model's other attributes
        return getattr(self.model, name)


def start_module(module: str, spec: object, *argv: str, pass_fds: tuple[int, ...] = (),
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m module *argv` in a fresh interpreter, with the pickled spec on its stdin:
    unlike multiprocessing's spawn, it never imports the caller's __main__, so a script
    need not guard its LLM(...) call."""
    process = subprocess.Popen([sys.executable, "-m", module, *argv], stdin=subprocess.PIPE,
                               pass_fds=pass_fds, env=env)
    assert process.stdin is not None
    process.stdin.write(pickle.dumps(spec))
    process.stdin.close()
    return process


def start_worker(spec: WorkerSpec) -> subprocess.Popen:
    """A worker rank (kvflow/executor/worker.py)."""
    return start_module("kvflow.executor.worker", spec)


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
            raise ValueError(f"tensor_parallel_size={parallel.tensor_parallel_size}, "
                             f"pipeline_parallel_size={parallel.pipeline_parallel_size} on "
                             f"{spec.device.type}: kvflow splits models across CPU ranks "
                             "(gloo) only; NCCL ranks on GPUs are not built yet")
        self.spec = spec
        self.max_in_flight = parallel.pipeline_parallel_size
        self._own_config = parallel.model_config(spec.config, 0)
        stages = [parallel.model_config(spec.config, parallel.rank_of(stage, 0))
                  for stage in range(parallel.pipeline_parallel_size)]
        self._rank_config = max(stages, key=lambda c: len(c.held_layers))
        self.failure: str | None = None
        self.store = open_store(parallel, 0)
        self.parallel = parallel = replace(parallel, master_port=self.store.port)
        shm_paths = ([ShmCommunicator.create(parallel.tensor_parallel_size)
                      for _ in range(parallel.pipeline_parallel_size)]
                     if parallel.nnodes == 1 and parallel.tensor_parallel_size > 1
                     and shared_memory_works() else [None] * parallel.pipeline_parallel_size)
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
                shm_path = shm_paths[parallel.stage_of(rank)]
                worker = WorkerSpec(spec, parallel, rank, threads, cores[local],
                                    None if shm_path is None else str(shm_path),
                                    logging.getLogger("kvflow").getEffectiveLevel())
                process = start_worker(worker)
                started.append(process)
                self.workers[rank] = process
            logger.info("%d ranks (tensor parallel %d x pipeline %d), %d on this machine "
                        "(pids %s), %d thread(s) each", parallel.world_size,
                        parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                        parallel.ranks_per_node,
                        ", ".join(str(p.pid) for p in self.workers.values()) or "-", threads)
            self.links = connect(self.store, parallel, 0, self.liveness, shm_paths[0],
                                 spec.config.hidden_size, spec.dtype)
            with building(TensorParallel(0, parallel.tensor_parallel_size, self.links.tp)):
                self._model = spec.build(self._own_config)
        except BaseException:
            self.shutdown()
            raise
        finally:
            for path in shm_paths:  # every local rank has mapped it by now, or failed
                if path is not None:
                    path.unlink(missing_ok=True)

    @property
    def rank_config(self) -> ModelConfig:
        """The stage with the most layers, whose KV cache sizes every stage's."""
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
        stage = RankZeroStage(self._model, self.links, self.parallel)
        stage.announce((KV_CACHE, settings.num_blocks, settings.block_size, backend.name), [])
        self.runner = ModelRunner(stage, self.spec.config, backend,  # type: ignore[arg-type]
                                  settings.num_blocks, settings.block_size, self.spec.dtype,
                                  self.spec.device, settings.seed, speculator,
                                  settings.batch_invariant, kv_config=self._own_config,
                                  max_model_len=settings.max_model_len,
                                  native_ops=self.spec.kernels().native_ops)

    def held_bytes(self) -> tuple[int, int]:
        """Rank 0's, plus what each other rank wrote to the store once it had built its
        part (ranks on other machines too)."""
        total, experts = super().held_bytes()
        for rank in range(1, self.parallel.world_size):
            rank_total, rank_experts = map(int, self.store.get(f"{HELD_BYTES}/{rank}").split())
            total, experts = total + rank_total, experts + rank_experts
        return total, experts

    def submit(self, scheduler_output: SchedulerOutput, previous: StepInFlight | None = None,
               sample: bool = False) -> StepInFlight | None:
        return self._checked(functools.partial(self.runner.submit, previous=previous,
                                               sample=sample), scheduler_output)

    def finish(self, step: StepInFlight | None) -> RunnerOutput:
        return self._checked(self.runner.finish, step)

    def _checked(self, fn, arg):  # noqa: ANN001, ANN202
        self.check_health()
        try:
            return fn(arg)
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
            logger.error("the engine's ranks stop: %s", reason)
            self.shutdown()

    def shutdown(self) -> None:
        links = getattr(self, "links", None)
        if links is not None and self.failure is None and hasattr(self, "runner"):
            # Healthy ranks end cleanly (a headless machine's exit with 0); ranks on this
            # machine are stopped below in any case.
            self.failure = "the engine has shut down"
            links.set_timeout(STOP_GRACE_S)  # a rank that does not answer is stopped below
            try:
                self.runner.model.announce((STOP,), [])
                if links.pipe is not None:
                    links.pipe.flush()
            except WorkerFailedError:
                pass
        self._finalizer()
        if self._pinned is not None and self._pinned[0] == threading.get_ident():
            os.sched_setaffinity(0, self._pinned[1])
            self._pinned = None
        if links is not None:
            links.close()
