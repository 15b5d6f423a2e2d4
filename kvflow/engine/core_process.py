"""An engine core in a process of its own, for `kvflow serve --data-parallel-size N`.

`python -m kvflow.engine.core_process FD` reads its CoreSpec on stdin and talks to the API
server over the socket FD (a socketpair the server made, so no other process can reach
it), with pickled tuples:

  server -> core: ("add", request_id, prompt, params, arrival_time, priority),
                  ("abort", request_id), ("abort_all", reason), ("reset", call_id),
                  ("shutdown", grace_s)
  core -> server: ("ready", CoreFacts) or ("failed", why) once, then
                  ("batch", [("output", RequestOutput) | ("error", request_id, kind, why)],
                   CoreStatus), ("reply", call_id, value), and ("dead", why) last if its
                  engine fails

Inside, the core is the same AsyncEngine a single-engine server runs on a thread, driven
by this process's event loop: tokenizing, detokenizing for the API and HTTP stay in the
API server's process, off the cores' step loops. The outputs of one turn of the event
loop go in one batch, with the engine's figures. The core ends when its server closes
the socket, so a server that dies leaves no core behind.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from kvflow.engine.args import EngineArgs
from kvflow.engine.async_engine import (AsyncEngine, EngineDeadError, RequestFailedError)
from kvflow.engine.client import EngineFacts
from kvflow.engine.input_preparer import InputLimits
from kvflow.engine.llm_engine import LLMEngine
from kvflow.engine.stats import EngineStats, StepObservations, StepRecord

logger = logging.getLogger("kvflow.core")

HEARTBEAT_S = 0.25  # an idle core's figures reach the server this often


@dataclass
class CoreSpec:
    args: EngineArgs  # data_parallel_size 1: this core's engine
    index: int
    cores: tuple[int, ...] | None  # the CPUs it runs on; None: unbound
    log_level: int


@dataclass(frozen=True)
class CoreFacts:
    """What a core tells its server once loaded: its EngineFacts without the tokenizer,
    which the server loads itself from tokenizer_path."""

    facts: EngineFacts
    limits: InputLimits
    tokenizer_path: str


@dataclass
class CoreStatus:
    """A core's figures, with every batch: its engine's stats, the sequences it has taken
    from the socket, and the per-step observations since the last batch."""

    stats: EngineStats
    num_waiting: int  # sequences its engine has not admitted, its inbox's included
    received_sequences: int
    iteration_tokens: list[int] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)


class CoreServer:
    """Runs one AsyncEngine for the API server at the other end of conn."""

    def __init__(self, engine: AsyncEngine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self._tasks: dict[str, asyncio.Task] = {}
        self._items: list[tuple] = []
        self._flush_scheduled = False
        self._received = 0
        self._grace_s = 0.0
        self._done: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failure: str | None = None

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self.engine.on_failure = self._engine_failed
        self.engine.start()
        threading.Thread(target=self._read, name="kvflow-core-reader", daemon=True).start()
        heartbeat = asyncio.create_task(self._heartbeat())
        await self._done.wait()
        heartbeat.cancel()
        await asyncio.to_thread(self.engine.shutdown, self._grace_s)
        for task in list(self._tasks.values()):
            await asyncio.gather(task, return_exceptions=True)
        self._flush()
        if self.failure is not None:
            self._send(("dead", self.failure))

    def _read(self) -> None:
        """On its own thread: the server's messages, into the event loop."""
        assert self._loop is not None
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = ("shutdown", 0.0)  # the server has gone: nothing to answer
            try:
                self._loop.call_soon_threadsafe(self._handle, message)
            except RuntimeError:  # the loop has closed
                return
            if message[0] == "shutdown":
                return

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            self._add(*message[1:])
        elif kind == "abort":
            task = self._tasks.get(message[1])
            if task is not None:
                task.cancel()  # generate()'s exit aborts the request
        elif kind == "abort_all":
            self.engine.abort_all(message[1])
        elif kind == "reset":
            asyncio.create_task(self._reset(message[1]))
        elif kind == "shutdown":
            assert self._done is not None
            self._grace_s = message[1]
            self._done.set()

    def _add(self, request_id: str, prompt: dict[str, Any], params: Any, arrival: float,
             priority: int) -> None:
        try:
            prepared = self.engine.engine.prepare_request(request_id, prompt, params,
                                                          arrival, priority)
        except ValueError as exc:  # the server checked it: a core that disagrees says so
            self._received += params.n
            self._queue(("error", request_id, "refused", str(exc)))
            return
        self._received += len(prepared.children)
        self._tasks[request_id] = asyncio.create_task(self._run(request_id, prepared))

    async def _run(self, request_id: str, prepared: Any) -> None:
        try:
            async for output in self.engine.generate(prepared):
                self._queue(("output", output))
        except ValueError as exc:
            self._queue(("error", request_id, "refused", str(exc)))
        except RequestFailedError as exc:
            self._queue(("error", request_id, "failed", str(exc)))
        except EngineDeadError as exc:
            self._queue(("error", request_id, "dead", str(exc)))
        finally:
            self._tasks.pop(request_id, None)

    async def _reset(self, call_id: int) -> None:
        try:
            value: Any = await self.engine.reset_prefix_cache()
        except EngineDeadError as exc:
            value = exc
        self._send(("reply", call_id, value))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._flush()

    def _queue(self, item: tuple) -> None:
        """Sent at the end of this turn of the event loop, with whatever else it made."""
        self._items.append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        items, self._items = self._items, []
        observations = self.engine.observations
        drain = StepObservations.drain
        status = CoreStatus(self.engine.stats, self.engine.num_waiting_sequences,
                            self._received, drain(observations.iteration_tokens),
                            drain(observations.inter_token_latencies),
                            drain(observations.steps))
        self._send(("batch", items, status))

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError):  # the server has gone; the reader ends the core
            pass

    def _engine_failed(self, exc: BaseException) -> None:
        """On the engine thread, once every stream has heard: the core ends."""
        assert self._loop is not None and self._done is not None
        self.failure = f"{type(exc).__name__}: {exc}"
        try:
            self._loop.call_soon_threadsafe(self._done.set)
        except RuntimeError:
            pass


def load(spec: CoreSpec) -> tuple[AsyncEngine, CoreFacts]:
    engine = LLMEngine(spec.args)
    client = AsyncEngine(engine)
    client.check_answers()
    facts = CoreFacts(replace(client.facts, tokenizer=None), engine.preparer.limits,
                      engine.tokenizer_path)
    return client, facts


def main() -> int:
    conn = Connection(int(sys.argv[1]))
    spec: CoreSpec = pickle.loads(sys.stdin.buffer.read())
    root = logging.getLogger("kvflow")
    root.setLevel(spec.log_level)
    for handler in root.handlers:  # the server's format, each line naming its core
        handler.setFormatter(logging.Formatter(
            f"%(levelname)s %(asctime)s core {spec.index} %(name)s: %(message)s",
            datefmt="%H:%M:%S"))
    # Ctrl-C reaches every process of the terminal's group: the server alone decides
    # when a core stops, after its requests have had their grace.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.cores is not None:
        os.sched_setaffinity(0, spec.cores)
    try:
        engine, facts = load(spec)
    except BaseException as exc:  # noqa: BLE001 - the server reports it
        logger.exception("engine core %d failed to load", spec.index)
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    conn.send(("ready", facts))
    server = CoreServer(engine, conn)
    asyncio.run(server.serve())
    return 1 if server.failure is not None else 0


if __name__ == "__main__":
    # This module's classes pickled by their importable name, not as __main__'s.
    from kvflow.engine.core_process import main as core_main
    sys.exit(core_main())
