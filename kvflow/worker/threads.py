"""How many threads kvflow's CPU work runs on: one per physical core this process may use.

Hyper-threads share a core's vector units and caches, so a second thread per core slows
matmuls and memory-bound products down rather than up. A container's CPU quota (cgroup v2
cpu.max) caps the count; OMP_NUM_THREADS, where set, wins."""
from __future__ import annotations

import os
from pathlib import Path

import torch


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
