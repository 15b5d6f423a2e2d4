"""Worker threads for grammar masks, shared fairly between groups of jobs.

A pool's FIFO queue lets one request with many slow masks (64 sequences of a wide schema,
0.35 s or more each) hold every other constrained request behind them. Here each job
queues behind the jobs its own group already has waiting or running: a group's first job
goes before another group's second, so a slow group delays others by at most the jobs
already running. Threads start with the first job and end when the pool is dropped.
"""
from __future__ import annotations

import itertools
import queue
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
_Queue = queue.PriorityQueue  # of (rank, arrival, job or None to end a thread)


class FairPool:
    def __init__(self, num_threads: int, name: str) -> None:
        self.num_threads = num_threads
        self.name = name
        # rank: the jobs its group had outstanding when the job came; smallest first
        self._queue: _Queue[tuple[int, int, Callable[[], None] | None]] = _Queue()
        self._arrivals = itertools.count()
        self._outstanding: Counter[Hashable] = Counter()
        self._lock = threading.Lock()
        self._started = False
        weakref.finalize(self, _end_threads, self._queue, num_threads)

    def submit(self, group: Hashable, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()

        def run() -> None:
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the future's owner reads it
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._outstanding[group] -= 1
                    if not self._outstanding[group]:
                        del self._outstanding[group]

        with self._lock:
            if not self._started:
                for index in range(self.num_threads):
                    threading.Thread(target=_work, args=(self._queue,),
                                     name=f"{self.name}-{index}", daemon=True).start()
                self._started = True
            rank = self._outstanding[group]
            self._outstanding[group] += 1
        self._queue.put((rank, next(self._arrivals), run))
        return future


def _work(jobs: _Queue) -> None:
    """A thread's loop; it holds the queue, not the pool, so that the pool can be dropped."""
    while True:
        _, _, run = jobs.get()
        if run is None:
            return
        run()


def _end_threads(jobs: _Queue, num_threads: int) -> None:
    for index in range(num_threads):
        jobs.put((-1, index, None))
