"""How many threads kvflow's CPU work runs on: one per physical core this process may use.

Hyper-threads share a core's vector units and caches, so a second thread per core slows
matmuls and memory-bound products down rather than up. A container's CPU quota (cgroup v2
cpu.max) caps the count; OMP_NUM_THREADS, where set, wins. While other processes take
cores, ThreadGovernor runs fewer."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores: set[tuple[str, str]] = set()
    try:
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if "processor" not in fields:
                continue
            if allowed is not None and int(fields["processor"]) not in allowed:
                continue
            cores.add((fields.get("physical id", "0"), fields.get("core id", fields["processor"])))
    except (OSError, ValueError):
        pass
    return len(cores) or len(allowed or ()) or os.cpu_count() or 1


def cpu_quota() -> int | None:
    """Whole CPUs a cgroup v2 quota allows this process, or None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(quota) // int(period))


def default_num_threads() -> int:
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return min(physical_cores(), cpu_quota() or physical_cores())


def configure_threads(num_threads: int | None) -> int:
    """Sets torch's intra-op threads (None: default_num_threads()); returns the count."""
    count = num_threads or default_num_threads()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU seconds: busy on the CPUs this process may use (every process's),
    and this process's own (all its threads)."""

    busy: float
    own: float


def read_cpu_times() -> CpuTimes | None:
    """From /proc (Linux); None where it cannot be read."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        busy = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            if allowed is not None and int(name[3:]) not in allowed:
                continue
            ticks = [int(f) for f in fields]
            # idle and iowait are free time; steal (a VM's CPU taken by the host) is not.
            busy += sum(ticks[:8]) - ticks[3] - ticks[4]
        # Fields after the command name, which may hold spaces: utime and stime are the
        # 12th and 13th.
        own = sum(int(f) for f in
                  Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13])
    except (OSError, ValueError, IndexError):
        return None
    return CpuTimes(busy / hz, own / hz)


class ThreadGovernor:
    """Fits torch's intra-op thread count to the cores other processes leave free.

    kvflow's threads wait for each other at the end of every parallel loop, spinning
    (OpenMP's default, which keeps a quiet machine fast: passive waiting cost a quarter of
    single-stream decode on a 2-core Zen 4). With another process on one of the cores, the
    thread that shares it is descheduled for whole time slices while the others spin at
    the barrier: on that machine, with one busy loop beside it, decode fell from 23 to 7
    tokens/s, where one thread ran at 16. So every interval_s it measures how many cores
    the rest of the machine kept busy and runs on the ones left, between 1 and max_threads.
    Others at 0.4 of a core or less leave a core free.

    Thread count can change how oneDNN splits a large matmul's sums, so batch-invariant
    runs keep a fixed count (the engine makes no governor for them)."""

    SLACK = 0.4  # of a core others may take while it still counts as free

    def __init__(self, max_threads: int, interval_s: float = 0.5,
                 read: Callable[[], CpuTimes | None] = read_cpu_times,
                 clock: Callable[[], float] = time.monotonic,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 cores: int | None = None) -> None:
        self.max_threads = max_threads
        self.interval_s = interval_s
        self.threads = max_threads
        self._read, self._clock, self._set_threads = read, clock, set_threads
        # cores: a machine without hyper-threads of that many cores (tests); by default
        # this one's physical cores, against the logical CPUs /proc/stat counts.
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self._logical = cores or allowed or os.cpu_count() or 1
        self._cores = cores or physical_cores()
        self._last = read()
        self._last_at = clock()
        self.others = 0.0  # cores other processes kept busy over the last interval

    @property
    def active(self) -> bool:
        """Whether it can measure here (Linux's /proc)."""
        return self._last is not None

    def poll(self) -> int:
        """The thread count to run the next step on, set in torch when it changes."""
        now = self._clock()
        if self._last is None or now - self._last_at < self.interval_s:
            return self.threads
        times = self._read()
        if times is None:
            return self.threads
        elapsed = now - self._last_at
        # Busy logical CPUs, less this process's own, in physical cores.
        others = ((times.busy - self._last.busy) - (times.own - self._last.own)) / elapsed
        self.others = max(0.0, others) * self._cores / self._logical
        self._last, self._last_at = times, now
        free = self._cores - self.others
        threads = max(1, min(self.max_threads, int(free + self.SLACK)))
        if threads != self.threads:
            logger.info("CPU threads: %d -> %d (other processes kept %.1f of %d cores busy)",
                        self.threads, threads, self.others, self._cores)
            self.threads = threads
            self._set_threads(threads)
        return threads
