"""How ranks talk: the collectives a sharded forward pass needs (all-reduce, all-gather) and
rank 0's per-step message to the others, over torch.distributed's gloo, or over shared
memory where every rank is on one machine and that measures faster.

gloo over loopback costs about a millisecond per all-reduce of a hidden-size vector on a
2-core machine (its transport hands every call to its own threads), more than a 0.5B
model's whole layer; a shared-memory all-reduce is a copy and a flag per rank.
"""
from __future__ import annotations

import logging
import mmap
import os
import pickle
import platform
import time
import uuid
from abc import ABC, abstractmethod
from datetime import timedelta
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SLOT_BYTES = 4 * 2**20  # each rank's part of one exchange; larger collectives take several
MESSAGE_BYTES = 4 * 2**20  # rank 0's step message; a larger one goes over gloo
SPINS = 20_000  # polls before a waiting rank starts yielding its core
LIVENESS_EVERY_S = 0.1  # how often a long wait checks that its peers are alive
IDLE_SLEEP_S = 0.001
REASON_WAIT_S = 2.0  # how long a failed gloo call waits to learn which rank exited  # the poll interval of a rank waiting for work (after a second idle)


class WorkerFailedError(RuntimeError):
    """A rank died, hung or could not join: the engine cannot go on. Not a step's failure,
    which the engine recovers from by recomputing its requests."""


# -> None while every peer is alive, else why not (e.g. "rank 1 exited with code -9")
Liveness = Callable[[], str | None]


class Communicator(ABC):
    timeout_s: float  # how long a collective waits for the other ranks

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size
        # seconds per all-reduce of a hidden-size vector, by path, as measured at startup
        self.timings: dict[str, float] = {}

    @abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in place where it can), bit for bit the same on every rank."""

    @abstractmethod
    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x side by side along the last dim, in rank order."""

    @abstractmethod
    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0 sends obj (plain data, picklable); every rank returns it."""

    def close(self) -> None:
        """Releases what the communicator holds; idempotent."""


def gloo_failure(what: str, exc: BaseException, liveness: Liveness,
                 timeout_s: float) -> WorkerFailedError:
    """A failed gloo call, as the rank that stopped (a peer's socket closes a moment before
    its process is seen to have exited) or the timeout that ran out."""
    deadline = time.monotonic() + REASON_WAIT_S
    reason = liveness()
    while reason is None and time.monotonic() < deadline:
        time.sleep(0.05)
        reason = liveness()
    if reason is None and "Timed out" in str(exc):
        reason = f"a rank did not take part within {timeout_s:g} s"
    return WorkerFailedError(f"{what} failed: {reason or exc}")


class GlooCommunicator(Communicator):
    """torch.distributed's gloo process groups: any ranks, on any machines. The collectives'
    group times out (a rank that hangs); the messages' does not, since a rank waits for
    the next step's message as long as the engine is idle, and gloo closes a connection
    whose wait timed out."""

    def __init__(self, group: dist.ProcessGroupGloo, messages: dist.ProcessGroupGloo,
                 rank: int, size: int, liveness: Liveness, timeout_s: float) -> None:
        super().__init__(rank, size)
        self.group = group
        self.messages = messages
        self.liveness = liveness
        self.timeout_s = timeout_s

    @property
    def send_timeout(self) -> timedelta | None:
        """Rank 0's sends wait for every rank to take the message (gloo sends nothing
        until the receiver is ready): a hung rank is found there. The others wait for
        work without a deadline."""
        return timedelta(seconds=self.timeout_s) if self.rank == 0 else None

    def _run(self, work: Callable[[], Any], what: str) -> Any:
        try:
            return work().wait()
        except RuntimeError as exc:
            raise gloo_failure(what, exc, self.liveness, self.timeout_s) from exc

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self._run(lambda: self.group.allreduce([x]), "an all-reduce")
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._run(lambda: self.group.allgather([parts], [x]), "an all-gather")
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj: Any = None) -> Any:
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=5)), dtype=torch.uint8)
            length = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self._run(lambda: self.messages.broadcast(length, 0, self.send_timeout), "a broadcast")
        if self.rank != 0:
            data = torch.empty(int(length), dtype=torch.uint8)
        self._run(lambda: self.messages.broadcast(data, 0, self.send_timeout), "a broadcast")
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())


def shared_memory_works() -> bool:
    """The shared-memory path relies on stores becoming visible in program order (x86's
    total store order); elsewhere ranks use gloo."""
    return platform.machine().lower() in ("x86_64", "amd64")


class ShmCommunicator(Communicator):
    """Ranks on one machine, through one shared file mapped by each.

    Collectives: each rank copies its part into its slot of the current phase, then
    raises its flag to the collective's sequence number, and reads every slot once all
    flags are up. Two phases alternate: a rank can only write a phase again after every
    rank has raised its flag for the collective in between, which each does after reading
    the one before. Messages: rank 0 writes one, bumps the message number, and waits for
    every rank's acknowledgement before writing the next. Whatever does not fit a slot
    goes over `fallback` (gloo), which every rank reaches in the same order."""

    def __init__(self, path: Path, rank: int, size: int, fallback: GlooCommunicator,
                 liveness: Liveness, timeout_s: float) -> None:
        super().__init__(rank, size)
        self.fallback = fallback
        self.liveness = liveness
        self.timeout_s = timeout_s
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, layout_bytes(size))
        # flags[0:size]: collectives done per rank; flags[size]: message number;
        # flags[size + 1]: message length; flags[size + 2:2 * size + 2]: acknowledgements
        self.flags = np.frombuffer(self._map, dtype=np.int64, count=2 * size + 2)
        control = _control_bytes(size)
        self.slots = torch.frombuffer(self._map, dtype=torch.uint8, offset=control,
                                      count=2 * size * SLOT_BYTES).view(2, size, SLOT_BYTES)
        self.message = torch.frombuffer(self._map, dtype=torch.uint8,
                                        offset=control + 2 * size * SLOT_BYTES,
                                        count=MESSAGE_BYTES)
        self.seq = 0
        self.message_seq = 0
        self._others = [r for r in range(size) if r != rank]
        self._view_cache: dict[tuple, list[torch.Tensor]] = {}

    @classmethod
    def create(cls, size: int) -> Path | None:
        """A new zeroed file for `size` ranks (rank 0 makes it; every rank maps it), or None
        where there is no room for it (a small /dev/shm): the ranks then use gloo."""
        folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get(
            "TMPDIR", "/tmp"))
        path = folder / f"kvflow-tp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(path, "wb") as f:
                # Reserved now: a tmpfs that fills later would kill a rank with SIGBUS.
                os.posix_fallocate(f.fileno(), 0, layout_bytes(size))
        except OSError as exc:
            path.unlink(missing_ok=True)
            logger.warning("no shared memory for the ranks' collectives (%s); using gloo", exc)
            return None
        return path

    def _wait(self, ready: Callable[[], bool], what: str, idle: bool = False) -> None:
        """Polls `ready`: spins, then yields the core, checking the peers every
        LIVENESS_EVERY_S; gives up after timeout_s unless `idle` (waiting for work)."""
        for _ in range(SPINS):
            if ready():
                return
        start = last_check = time.monotonic()
        while not ready():
            now = time.monotonic()
            if now - last_check > LIVENESS_EVERY_S:
                last_check = now
                reason = self.liveness()
                if reason is not None:
                    raise WorkerFailedError(f"{what} failed: {reason}")
                if not idle and now - start > self.timeout_s:
                    raise WorkerFailedError(f"{what} failed: a rank did not take part within "
                                            f"{self.timeout_s:g} s")
            if idle and now - start > 1.0:
                time.sleep(IDLE_SLEEP_S)
            else:
                os.sched_yield()

    def _views(self, phase: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's slot of `phase` as a tensor like x (made once per shape: a decode
        step makes the same few dozen collectives every time)."""
        key = (phase, x.dtype, tuple(x.shape))
        views = self._view_cache.get(key)
        if views is None:
            nbytes = x.numel() * x.element_size()
            views = [self.slots[phase, r, :nbytes].view(x.dtype).view(x.shape)
                     for r in range(self.size)]
            self._view_cache[key] = views
        return views

    def _exchange(self, x: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's x, once all have written theirs."""
        self.seq += 1
        seq, flags = self.seq, self.flags
        views = self._views(seq & 1, x)
        views[self.rank].copy_(x)
        flags[self.rank] = seq
        others = self._others
        self._wait(lambda: all(flags[r] >= seq for r in others), what)
        return views

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x if x.is_contiguous() else x.contiguous()
        flat = out.view(-1)
        step = SLOT_BYTES // x.element_size()
        for start in range(0, flat.numel(), step):  # a prefill's sum, a slot at a time
            chunk = flat[start:start + step]
            parts = self._exchange(chunk, "an all-reduce")
            torch.add(parts[0], parts[1], out=chunk)
            for part in parts[2:]:
                chunk.add_(part)
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if x.dim() < 2:
            x = x.unsqueeze(0)
            return self.all_gather(x).squeeze(0)
        row_bytes = x[0].numel() * x.element_size()
        if row_bytes > SLOT_BYTES:
            return self.fallback.all_gather(x)
        step = SLOT_BYTES // row_bytes
        # Many rows of logits a slot at a time, each gathered side by side.
        return torch.cat([torch.cat(self._exchange(x[start:start + step], "an all-gather"),
                                    dim=-1) for start in range(0, x.shape[0], step)])

    def broadcast(self, obj: Any = None) -> Any:
        flags, size = self.flags, self.size
        acks = flags[size + 2:2 * size + 2]
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=5)
            seq = self.message_seq
            # The previous message must have been read before it is overwritten.
            self._wait(lambda: int(acks[1:].min()) >= seq, "a step message")
            if len(data) <= MESSAGE_BYTES:
                self.message[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            flags[size + 1] = len(data)
            self.message_seq = flags[size] = seq + 1
            if len(data) > MESSAGE_BYTES:
                self.fallback.broadcast(obj)
            return obj
        seq = self.message_seq + 1
        self._wait(lambda: int(flags[size]) >= seq, "waiting for a step message", idle=True)
        length = int(flags[size + 1])
        obj = (self.fallback.broadcast() if length > MESSAGE_BYTES
               else pickle.loads(self.message[:length].numpy().tobytes()))
        self.message_seq = seq
        acks[self.rank] = seq
        return obj

    def close(self) -> None:
        if self._fd >= 0:
            # Views into the map are released with the map; torch holds no copy.
            del self.flags, self.slots, self.message, self._view_cache
            try:
                self._map.close()
            except BufferError:  # a tensor still views it: the OS reclaims it at exit
                pass
            os.close(self._fd)
            self._fd = -1


def _control_bytes(size: int) -> int:
    return 64 * (-(-(8 * (2 * size + 2)) // 64))  # the flags, padded to a cache line


def layout_bytes(size: int) -> int:
    return _control_bytes(size) + 2 * size * SLOT_BYTES + MESSAGE_BYTES


def time_all_reduce(comm: Communicator, numel: int, dtype: torch.dtype,
                    repeats: int = 30) -> float:
    """Median seconds of one all-reduce of `numel` elements (every rank runs it)."""
    x = torch.ones(numel, dtype=dtype)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        comm.all_reduce(x)
        times.append(time.perf_counter() - start)
        x.fill_(1)
    return sorted(times)[len(times) // 2]
