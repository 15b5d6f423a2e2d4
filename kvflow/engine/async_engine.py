"""LLMEngine on a background thread, for an asyncio server.

The engine thread owns the engine: requests and aborts reach it through an inbox, and
each request's outputs go back to the event loop through its own asyncio.Queue. The HTTP
event loop never waits on model compute.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from kvflow.engine.client import CoreState, EngineClient, EngineFacts, InFlight
from kvflow.engine.input_preparer import PreparedRequest, PromptType
from kvflow.engine.llm_engine import EngineStepError, LLMEngine
from kvflow.engine.stats import EngineStats, StepObservations
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


MAX_CONSECUTIVE_STEP_FAILURES = 3
# What clients read when the engine has stopped; the cause is in the server's log only.
ENGINE_STOPPED = "the engine has stopped after a failure (the server log has the cause)"
PROBE_PREFIX = "kvflow-probe-"  # never a client's: the server names requests itself
PROBE_MAX_STEPS = 4  # a one-token prompt and one token take one step


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can make progress."""


class RequestFailedError(RuntimeError):
    """An engine step failed while running this request; the engine goes on serving."""


class OutputStream:
    """What the engine has produced for one request and its consumer has not taken yet:
    only the latest output, since outputs are cumulative. A consumer that stops reading
    then pins one output, not every step's (which grows with the square of its length)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._ready = asyncio.Event()
        self._latest: RequestOutput | BaseException | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        """On the event loop. An exception, or a finished output, is the last item."""
        self._latest = item
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        self._ready.clear()
        item, self._latest = self._latest, None
        assert item is not None
        return item


def deliver(stream: OutputStream, item: RequestOutput | BaseException) -> None:
    """From any thread: the item to its stream, on the stream's event loop."""
    try:
        stream.loop.call_soon_threadsafe(stream.put, item)
    except RuntimeError:  # the client's event loop has closed
        pass


def settle_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future, outcome: Any,
                failed: bool) -> None:
    """From any thread: the future's result (or exception, if failed), on its loop."""
    def settle() -> None:
        if not future.done():  # the caller may have gone
            (future.set_exception if failed else future.set_result)(outcome)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's event loop has closed
        pass


async def relay(stream: OutputStream, prepared: PreparedRequest,
                in_flight: dict[str, InFlight],
                abort: Callable[[str], None]) -> AsyncIterator[RequestOutput]:
    """A request's outputs from its stream until it finishes, recorded in in_flight
    meanwhile. An exception from the engine (refused, failed, stopped) is raised, and
    ends it; a consumer that leaves early aborts it."""
    parent = prepared.parent
    record = InFlight(parent.request_id, parent.metrics.arrival_time,
                      len(parent.prompt_token_ids))
    in_flight[parent.request_id] = record
    settled = False  # finished, or ended by the engine: nothing to abort
    try:
        while True:
            item = await stream.get()
            if isinstance(item, BaseException):
                settled = True
                raise item
            settled = item.finished
            record.saw(item)
            yield item
            if settled:
                return
    finally:
        in_flight.pop(parent.request_id, None)
        if not settled:
            abort(parent.request_id)


@dataclass
class _Add:
    prepared: PreparedRequest
    stream: OutputStream


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortAll:
    reason: str


@dataclass
class _Call:
    """Run fn(engine) on the engine thread, between steps, and hand back its result."""

    fn: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


_Message = _Add | _Abort | _AbortAll | _Call


class AsyncEngine(EngineClient):
    """The engine core on a thread of this process, behind the EngineClient interface."""

    def __init__(self, engine: LLMEngine,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        """on_failure: called on the engine thread once the loop has failed, after every
        stream has been told."""
        self.engine = engine
        self.facts = EngineFacts.of(engine)
        self.on_failure = on_failure
        self._inbox: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._streams: dict[str, OutputStream] = {}  # owned by the engine thread
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvflow-engine", daemon=True)
        self.error: BaseException | None = None
        # Each written by one thread only (the event loop, the engine thread), so that their
        # difference, the sequences still in the inbox, needs no lock.
        self._sent_sequences = 0
        self._taken_sequences = 0
        self._inbox_lock = threading.Lock()
        self._inbox_closed = False
        self._consecutive_failures = 0
        self._probe_ids = itertools.count()
        # Requests between generate()'s first and last output, by id; the event loop's alone.
        self.in_flight: dict[str, InFlight] = {}

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def prepare_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                        priority: int = 0) -> PreparedRequest:
        # Reads only what is fixed after load (tokenizer, config, limits): any thread.
        return self.engine.prepare_request(request_id, prompt, params, priority=priority)

    async def reset_prefix_cache(self) -> int:
        return await self.call(lambda engine: engine.reset_prefix_cache())

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    @property
    def observations(self) -> StepObservations:
        return self.engine.observations

    def cores(self) -> list[CoreState]:
        return [CoreState(index=0, alive=self.alive, stats=self.engine.stats,
                          num_requests=len(self.in_flight),
                          num_waiting=self.num_waiting_sequences, routed={},
                          failure=None if self.error is None else repr(self.error))]

    @property
    def num_waiting_sequences(self) -> int:
        """Sequences queued for the engine: those it has not admitted, plus those still in
        its inbox. A plain read of two sizes, safe from any thread."""
        return self.engine.stats.num_waiting + self._sent_sequences - self._taken_sequences

    def start(self) -> None:
        self._thread.start()

    async def generate(self, prepared: PreparedRequest) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them (cumulative), until it finishes.
        Leaving early (a client that disconnects) aborts the request and frees its blocks."""
        if not self.alive:
            raise EngineDeadError(ENGINE_STOPPED)
        stream = OutputStream(asyncio.get_running_loop())
        self._send(_Add(prepared, stream))
        self._sent_sequences += len(prepared.children)
        async for output in relay(stream, prepared, self.in_flight, self.abort):
            yield output

    def abort(self, request_id: str) -> None:
        self._send_unless_closed(_Abort(request_id))

    def abort_all(self, reason: str) -> None:
        """Abort every request; each stream ends with EngineDeadError(reason)."""
        self._send_unless_closed(_AbortAll(reason))

    def _send_unless_closed(self, message: _Abort | _AbortAll) -> None:
        try:
            self._send(message)
        except EngineDeadError:
            pass  # the engine thread's final drain has aborted everything

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """fn(engine), run on the engine thread between two steps (engine state is the
        engine thread's alone)."""
        if not self.alive:
            raise EngineDeadError(ENGINE_STOPPED)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._send(_Call(fn, loop, future))
        return await future

    def _send(self, message: _Message) -> None:
        """Raises EngineDeadError once the engine thread has taken its last message: what
        is sent before that is answered by its final drain, so nothing waits for ever."""
        with self._inbox_lock:
            if self._inbox_closed:
                raise EngineDeadError(ENGINE_STOPPED)
            self._inbox.put(message)
        self._wake.set()

    def shutdown(self, grace_s: float) -> None:
        """Let running requests finish for up to grace_s seconds, then abort the rest."""
        deadline = time.monotonic() + grace_s
        while self.alive and self.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(IDLE_WAIT_S)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=max(grace_s, 1.0))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:  # noqa: BLE001 - every stream must hear of it
            logger.exception("the engine loop failed")
            self.error = exc
            for stream in self._streams.values():
                deliver(stream, EngineDeadError(ENGINE_STOPPED))
        finally:
            with self._inbox_lock:
                self._inbox_closed = True
                self._inbox.put(_AbortAll("the server is shutting down"))
            self._drain_inbox()
            self.engine.shutdown()
        if self.error is not None and self.on_failure is not None:
            self.on_failure(self.error)

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, _Add):
                self._taken_sequences += len(message.prepared.children)
                if self._stop.is_set() or self.error is not None:
                    deliver(message.stream, EngineDeadError("the engine is not running"))
                    continue
                try:
                    self.engine.add_prepared(message.prepared)
                except ValueError as exc:
                    deliver(message.stream, exc)
                    continue
                self._streams[message.prepared.parent.request_id] = message.stream
            elif isinstance(message, _Call):
                self._run_call(message)
            elif isinstance(message, _Abort):
                self.engine.abort_request(message.request_id)
                self._streams.pop(message.request_id, None)
            else:
                for request_id in list(self._streams):
                    self.engine.abort_request(request_id)
                    deliver(self._streams.pop(request_id), EngineDeadError(message.reason))

    def _run_call(self, call: _Call) -> None:
        if self._stop.is_set() or self.error is not None:
            outcome, failed = EngineDeadError("the engine is not running"), True
        else:
            try:
                outcome, failed = call.fn(self.engine), False
            except Exception as exc:  # noqa: BLE001 - the caller's to handle
                outcome, failed = exc, True
        settle_soon(call.loop, call.future, outcome, failed)

    def _step(self) -> None:
        """One engine step. When a step of several requests fails, the engine has requeued
        them to run alone, one step each: a request that fails alone is failed here, and a
        probe request then runs alone to tell a bad request from a broken engine. The
        probe failing, or MAX_CONSECUTIVE_STEP_FAILURES failures in a row that no request
        explains, end the engine."""
        try:
            outputs = self.engine.step()
        except EngineStepError as exc:
            self._consecutive_failures += 1
            logger.error("%s (%d in a row)%s", exc, self._consecutive_failures,
                         "" if exc.alone else "; each of its requests now runs alone",
                         exc_info=exc.__cause__)
            if any(r.startswith(PROBE_PREFIX) for r in exc.request_ids):
                raise EngineDeadError("a probe request failed: the engine cannot run a "
                                      "step") from exc
            if not exc.request_ids and \
                    self._consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            if exc.alone and exc.request_ids:
                self._fail(exc.request_ids[0], type(exc.__cause__).__name__)
                self._probe()
            return
        self._consecutive_failures = 0
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            deliver(stream, output)

    def _fail(self, request_id: str, cause: str) -> None:
        self.engine.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            deliver(stream, RequestFailedError(
                f"the engine failed while running this request ({cause}); other requests "
                "are unaffected"))

    def check_answers(self) -> None:
        """Runs a probe request to its end on the calling thread, before start(): a server
        reports itself healthy only once its engine has answered. Raises EngineStepError
        (or RuntimeError) if the engine cannot."""
        assert not self._thread.is_alive()
        request_id = self._add_probe()
        for _ in range(PROBE_MAX_STEPS):
            if any(o.request_id == request_id and o.finished for o in self.engine.step()):
                return
        raise RuntimeError(f"a one-token request did not finish in {PROBE_MAX_STEPS} steps")

    def _probe(self) -> None:
        """A probe request, next to run alone."""
        self.engine.scheduler.isolate([self._add_probe()], first=True)

    def _add_probe(self) -> str:
        """A one-token greedy request: it fails only if the engine does."""
        request_id = f"{PROBE_PREFIX}{next(self._probe_ids)}"
        self.engine.add_request(request_id, {"prompt_token_ids": [0]},
                                SamplingParams(max_tokens=1, temperature=0.0), internal=True)
        return request_id
