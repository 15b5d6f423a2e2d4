"""Data parallelism: N engine cores, each a copy of the model in a process of its own
(kvflow/engine/core_process.py) with its own CPUs, behind the one EngineClient the API
server talks to. Requests are prepared (tokenized, checked) here and sent to the core
the Router picks; each core's outputs come back on a reader thread per core and go to
their requests' streams on the event loop.

A core that dies is taken out of routing. Its requests that have had no output yet are
sent to another core, as if they had just arrived; the others end with an error. The
rest keep serving, and the server reports itself degraded. When no core is left the
server exits, as it does when a rank dies.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

import torch

from kvflow.distributed.comm import WorkerFailedError
from kvflow.engine.args import EngineArgs
from kvflow.engine.async_engine import (ENGINE_STOPPED, EngineDeadError, OutputStream,
                                        RequestFailedError, deliver, relay, settle_soon)
from kvflow.engine.client import CoreState, EngineClient, EngineFacts, InFlight
from kvflow.engine.core_process import CoreFacts, CoreSpec, CoreStatus
from kvflow.engine.input_preparer import InputPreparer, PreparedRequest, PromptType
from kvflow.engine.router import Router, RoutingConfig
from kvflow.engine.stats import EngineStats, StepObservations
from kvflow.executor.multiproc import STOP_GRACE_S, core_lists, start_module
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.tokenizer.loader import load_tokenizer
from kvflow.worker.threads import default_num_threads

logger = logging.getLogger(__name__)

READY_POLL_S = 0.5


class CoreLoadError(RuntimeError):
    """An engine core could not load its model."""


@dataclass
class _Core:
    """The API server's end of one engine core. Messages to it go through a queue that
    a thread of its own sends, so that a core that stops reading (hung) never blocks the
    event loop."""

    index: int
    process: subprocess.Popen
    conn: Connection
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    alive: bool = True
    failure: str | None = None
    status: CoreStatus | None = None
    sent_sequences: int = 0
    load: int = 0  # sequences routed here and not finished
    requests: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        threading.Thread(target=self._send_all, daemon=True,
                         name=f"kvflow-core-{self.index}-sender").start()

    def send(self, message: tuple) -> None:
        self.outbox.put(message)

    def _send_all(self) -> None:
        while True:
            message = self.outbox.get()
            if message is None:
                return
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # it has gone: its reader reports that
                return


@dataclass
class _Routed:
    """A request between generate()'s start and its end, and the core answering it."""

    prepared: PreparedRequest
    stream: OutputStream
    core: int = -1
    answered: bool = False  # an output reached its stream: it can no longer be retried

    @property
    def num_sequences(self) -> int:
        return len(self.prepared.children)


def start_core(spec: CoreSpec, gpu: str | None) -> tuple[subprocess.Popen, Connection]:
    """A core in a fresh interpreter, as a rank is started, with one end of a socketpair
    as its line to this process; gpu: the one GPU it sees."""
    ours, theirs = socket.socketpair()
    env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
    with ours, theirs:
        process = start_module("kvflow.engine.core_process", spec, str(theirs.fileno()),
                               pass_fds=(theirs.fileno(),), env=env)
        return process, Connection(ours.detach())


def core_args(args: EngineArgs) -> tuple[EngineArgs, list[tuple[int, ...] | None]]:
    """Each core's engine arguments, and the CPUs each runs on: this machine's cores
    shared among the cores (and among each core's tensor/pipeline ranks)."""
    cores = args.data_parallel_size
    ranks = args.parallel_config().world_size
    threads = args.num_threads or max(1, default_num_threads() // (cores * ranks))
    return (replace(args, data_parallel_size=1, num_threads=threads),
            core_lists(cores, threads * ranks))


def core_gpus(cores: int, device: str, visible: str | None,
              count: int) -> list[str | None]:
    """The GPU each core sees (CUDA_VISIBLE_DEVICES), one each, from those this process
    sees; None each on the CPU."""
    if device != "cuda":
        return [None] * cores
    gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else \
        [str(i) for i in range(count)]
    if len(gpus) < cores:
        raise ValueError(f"data_parallel_size={cores} on CUDA takes a GPU per engine core; "
                         f"this process sees {len(gpus)}")
    return gpus[:cores]


class DataParallelClient(EngineClient):
    def __init__(self, args: EngineArgs, routing: RoutingConfig,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Starts args.data_parallel_size cores and waits until each has loaded and
        answered a probe request; raises CoreLoadError if one cannot."""
        self.on_failure = on_failure
        self.hang_timeout_s = args.distributed_timeout
        one, cpus = core_args(args)
        device = args.resolve_device().type
        gpus = core_gpus(len(cpus), device, os.environ.get("CUDA_VISIBLE_DEVICES"),
                         torch.cuda.device_count() if device == "cuda" else 0)
        level = logging.getLogger("kvflow").getEffectiveLevel()
        self._cores: list[_Core] = []
        try:
            for index, cores in enumerate(cpus):
                process, conn = start_core(CoreSpec(one, index, cores, level), gpus[index])
                self._cores.append(_Core(index, process, conn))
            logger.info("%d engine cores (pids %s), %d thread(s) each%s", len(self._cores),
                        ", ".join(str(c.process.pid) for c in self._cores), one.num_threads,
                        "" if cpus[0] is None else ", on CPUs " + " | ".join(
                            ",".join(map(str, c)) for c in cpus if c is not None))
            ready = [self._wait_ready(core) for core in self._cores]
        except BaseException:
            self._stop_processes(0.0)
            raise
        first = ready[0]
        self.preparer = InputPreparer(load_tokenizer(first.tokenizer_path), first.limits)
        self.facts: EngineFacts = replace(first.facts, tokenizer=self.preparer.tokenizer)
        limits = first.limits
        self.router = Router(routing, len(self._cores), limits.block_size,
                             limits.num_usable_blocks)
        self.in_flight: dict[str, InFlight] = {}
        self._requests: dict[str, _Routed] = {}
        self._lock = threading.Lock()  # _requests, each core's load and requests, routing
        self._observations = StepObservations()
        self._calls = itertools.count()
        # call id -> the core asked, and where its answer goes
        self._replies: dict[int, tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._stopping = False
        self._failure_reported = False

    def _wait_ready(self, core: _Core) -> CoreFacts:
        while not core.conn.poll(READY_POLL_S):
            if core.process.poll() is not None:
                raise CoreLoadError(f"engine core {core.index} exited with code "
                                    f"{core.process.returncode} while loading")
        try:
            message = core.conn.recv()
        except (EOFError, OSError):
            raise CoreLoadError(f"engine core {core.index} exited while loading") from None
        if message[0] != "ready":
            raise CoreLoadError(f"engine core {core.index} failed to load: {message[1]}")
        return message[1]

    # --- the EngineClient interface ---------------------------------------------------

    def start(self) -> None:
        for core in self._cores:
            threading.Thread(target=self._read, args=(core,), daemon=True,
                             name=f"kvflow-core-{core.index}").start()

    def check_answers(self) -> None:
        """Each core answered a probe request before it said it was ready: what is left
        to check is that none has stopped since."""
        for core in self._cores:
            if core.process.poll() is not None:
                raise CoreLoadError(f"engine core {core.index} exited with code "
                                    f"{core.process.returncode} after loading")

    @property
    def alive(self) -> bool:
        return any(core.alive for core in self._cores)

    @property
    def degraded(self) -> bool:
        return not all(core.alive for core in self._cores)

    def prepare_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                        priority: int = 0) -> PreparedRequest:
        return self.preparer.prepare(request_id, prompt, params, priority=priority)

    async def generate(self, prepared: PreparedRequest) -> AsyncIterator[RequestOutput]:
        if not self.alive:
            raise EngineDeadError(ENGINE_STOPPED)
        parent = prepared.parent
        routed = _Routed(prepared, OutputStream(asyncio.get_running_loop()))
        with self._lock:
            if parent.request_id in self._requests:
                raise ValueError(f"request id {parent.request_id!r} is already in use")
            self._requests[parent.request_id] = routed
            self._dispatch(routed)
        async for output in relay(routed.stream, prepared, self.in_flight, self.abort):
            yield output

    def abort(self, request_id: str) -> None:
        with self._lock:
            routed = self._requests.get(request_id)
            if routed is None:
                return
            core = self._cores[routed.core]
            self._settle(routed)
        self._send(core, ("abort", request_id))

    def abort_all(self, reason: str) -> None:
        """Every core ends each of its requests with EngineDeadError(reason)."""
        for core in self._cores:
            self._send(core, ("abort_all", reason))

    async def reset_prefix_cache(self) -> int:
        loop = asyncio.get_running_loop()
        waits = []
        for core in self._cores:
            call_id = next(self._calls)
            future = loop.create_future()
            self._replies[call_id] = (core.index, loop, future)
            if self._send(core, ("reset", call_id)):
                waits.append(future)
            else:
                self._replies.pop(call_id, None)
        with self._lock:
            for core in self._cores:
                self.router.forget(core.index)
        results = await asyncio.gather(*waits, return_exceptions=True)
        return sum(r for r in results if isinstance(r, int))

    @property
    def num_waiting_sequences(self) -> int:
        waiting = 0
        for core in self._cores:
            if not core.alive:
                continue
            status = core.status
            received = status.received_sequences if status else 0
            waiting += (status.num_waiting if status else 0) + core.sent_sequences - received
        return waiting

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def stats(self) -> EngineStats:
        """Every core's figures added up (the KV cache's use averaged), the stopped
        cores' last ones included, so that totals never go back."""
        return EngineStats.total([core.status.stats for core in self._cores if core.status])

    @property
    def observations(self) -> StepObservations:
        return self._observations

    def cores(self) -> list[CoreState]:
        return [CoreState(index=core.index, alive=core.alive,
                          stats=core.status.stats if core.status else EngineStats(),
                          num_requests=len(core.requests),
                          num_waiting=(core.status.num_waiting if core.status else 0),
                          routed=dict(self.router.decisions[core.index]),
                          failure=core.failure)
                for core in self._cores]

    def shutdown(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while self.alive and self._requests and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping = True
        self._stop_processes(max(0.0, deadline - time.monotonic()))

    def _stop_processes(self, grace_s: float) -> None:
        for core in self._cores:
            self._send(core, ("shutdown", grace_s))
            core.send(None)  # its sender thread's last message
        for core in self._cores:
            try:
                core.process.wait(grace_s + STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                core.process.kill()
                core.process.wait()
            core.conn.close()

    # --- routing and the cores' messages -------------------------------------------------

    def _dispatch(self, routed: _Routed) -> None:
        """Sends a request to the core the router picks (under self._lock); raises
        EngineDeadError when no core is left. A core that turns out to have gone has its
        unanswered requests sent again once its reader finds out."""
        prepared = routed.prepared
        parent = prepared.parent
        live = [core.alive for core in self._cores]
        if not any(live):
            self._requests.pop(parent.request_id, None)
            raise EngineDeadError(ENGINE_STOPPED)
        route = self.router.route(parent.prompt_token_ids, prepared.children[0].cache_salt,
                                  [core.load for core in self._cores], live)
        core = self._cores[route.core]
        routed.core = core.index
        core.load += routed.num_sequences
        core.requests.add(parent.request_id)
        core.sent_sequences += routed.num_sequences
        core.send(("add", parent.request_id, prepared.source, prepared.params,
                   parent.metrics.arrival_time, prepared.priority))

    def _settle(self, routed: _Routed, keep: bool = False) -> None:
        """A request leaves its core's count (under self._lock); keep: and stays known."""
        core = self._cores[routed.core]
        request_id = routed.prepared.parent.request_id
        if request_id in core.requests:
            core.requests.discard(request_id)
            core.load -= routed.num_sequences
        if not keep:
            self._requests.pop(request_id, None)

    @staticmethod
    def _send(core: _Core, message: tuple) -> bool:
        if not core.alive:
            return False
        core.send(message)
        return True

    def _read(self, core: _Core) -> None:
        """A core's messages, on a thread of their own, until its socket closes. A core
        that sends nothing, not even its heartbeat, for hang_timeout_s is hung: it is
        killed, and handled as a core that died."""
        while True:
            try:
                if not core.conn.poll(self.hang_timeout_s):
                    if not self._stopping:  # stopping, a core may take its grace
                        core.failure = (f"it sent nothing for {self.hang_timeout_s:g} s "
                                        "(hung), so it was killed")
                        core.process.kill()
                    continue  # its socket closes: the next recv raises
                message = core.conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "batch":
                self._take_batch(core, message[1], message[2])
            elif kind == "reply":
                self._reply(message[1], message[2])
            elif kind == "dead":
                core.failure = message[1]
        if self._stopping:
            return
        code = core.process.wait()
        why = core.failure or f"its process exited with code {code}"
        logger.error("engine core %d (pid %d) stopped: %s", core.index, core.process.pid, why)
        with self._lock:
            self._mark_failed(core, why)
            last = not self.alive and not self._failure_reported
            self._failure_reported |= last
        if last and self.on_failure is not None:
            self.on_failure(WorkerFailedError(f"every engine core has stopped; the last: "
                                              f"core {core.index}, {why}"))

    def _take_batch(self, core: _Core, items: list[tuple], status: CoreStatus) -> None:
        observations = self._observations
        observations.iteration_tokens.extend(status.iteration_tokens)
        observations.inter_token_latencies.extend(status.inter_token_latencies)
        observations.steps.extend(status.steps)
        core.status = status
        for item in items:
            request_id = item[1].request_id if item[0] == "output" else item[1]
            with self._lock:
                routed = self._requests.get(request_id)
                if routed is None or routed.core != core.index:
                    continue  # aborted here, or retried elsewhere
                if item[0] == "output":
                    routed.answered = True
                    if item[1].finished:
                        self._settle(routed)
                    value: RequestOutput | BaseException = item[1]
                else:
                    self._settle(routed)
                    kind, why = item[2], item[3]
                    value = (ValueError(why) if kind == "refused" else
                             RequestFailedError(why) if kind == "failed" else
                             EngineDeadError(why))
            deliver(routed.stream, value)

    def _reply(self, call_id: int, value: object) -> None:
        waiting = self._replies.pop(call_id, None)
        if waiting is None:
            return
        _, loop, future = waiting
        settle_soon(loop, future, value, failed=isinstance(value, BaseException))

    def _mark_failed(self, core: _Core, why: str) -> None:
        """Takes a core out of routing (under self._lock): its requests that have had no
        output go to another core, the others end with RequestFailedError."""
        if not core.alive:
            return
        core.alive = False
        core.failure = core.failure or why
        self.router.forget(core.index)
        for request_id in sorted(core.requests):
            routed = self._requests[request_id]
            self._settle(routed, keep=True)
            if not routed.answered and any(c.alive for c in self._cores):
                logger.warning("request %s goes to another core: core %d stopped before "
                               "it answered", request_id, core.index)
                self._dispatch(routed)
                continue
            self._requests.pop(request_id, None)
            deliver(routed.stream, RequestFailedError(
                f"engine core {core.index} stopped while answering this request ({why}); "
                "the other cores go on serving"))
        for call_id, (index, _, _) in list(self._replies.items()):
            if index == core.index:
                self._reply(call_id, EngineDeadError(f"engine core {core.index} stopped"))

