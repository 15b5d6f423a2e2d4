"""Worker threads for grammar masks, shared fairly between groups of jobs.

A pool's FIFO queue lets one request with many slow masks (64 sequences of a wide schema,
0.35 s or more each) hold every other constrained request behind them. Here each job
queues behind the jobs its own group already has waiting or running: a group's first job
goes before another group's second, so a slow group delays others by at most the jobs
already running. The threads are a ThreadPoolExecutor's, whose FIFO only hands out turns:
each turn runs the best job waiting at that moment.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class FairPool:
    def __init__(self, num_threads: int, name: str) -> None:
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix=name)
        # (rank: the jobs its group had outstanding when it came, arrival, group, job, its
        # future), smallest first
        self._waiting: list[tuple[int, int, Hashable, Callable[[], Any], Future]] = []
        self._arrivals = itertools.count()
        self._outstanding: Counter[Hashable] = Counter()
        self._lock = threading.Lock()

    def submit(self, group: Hashable, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            rank = self._outstanding[group]
            self._outstanding[group] += 1
            heapq.heappush(self._waiting, (rank, next(self._arrivals), group, fn, future))
        self._executor.submit(self._run_next)
        return future

    def _run_next(self) -> None:
        with self._lock:
            _, _, group, fn, future = heapq.heappop(self._waiting)
        try:
            if future.set_running_or_notify_cancel():
                future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - the future's owner reads it
            future.set_exception(exc)
        finally:
            with self._lock:
                self._outstanding[group] -= 1
                if not self._outstanding[group]:
                    del self._outstanding[group]
