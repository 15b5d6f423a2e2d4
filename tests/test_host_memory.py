"""A CPU step's large tensors reuse the pages the steps before it faulted in
(kvflow/worker/host_memory.py)."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

# Allocates and writes a 48 MiB tensor (above glibc's largest mmap threshold) eight times on
# the main thread, then on a thread started afterwards; prints the page faults of each
# round, and glibc's statistics per malloc arena to stderr. Before that, per argv[1]:
# "none" nothing; "engine PATH" builds a CPU engine from the checkpoint; "serve" runs
# `kvflow serve` up to the point where it would serve.
PROBE = r"""
import ctypes, json, resource, sys, threading

def rounds(out):
    import torch  # not before `kvflow serve` starts, as in the command

    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

def measure():
    main, thread = [], []
    rounds(main)
    worker = threading.Thread(target=rounds, args=(thread,))
    worker.start()
    worker.join()
    print(json.dumps({"main": main, "thread": thread}))
    sys.stdout.flush()
    ctypes.CDLL(None).malloc_stats()

if sys.argv[1] == "engine":
    from kvflow import LLM
    LLM(model=sys.argv[2], device="cpu", kv_cache_memory="16MiB", enforce_eager=True)
    measure()
elif sys.argv[1] == "serve":
    import kvflow.server.api_server as api_server
    from kvflow.cli import main

    def serve(args, renderer=None):
        measure()
        if renderer is not None:
            renderer.close()

    api_server.serve = serve
    main(["serve", sys.argv[2], "--device", "cpu"])
else:
    measure()
"""
PAGES = (48 << 20) // 4096


def faults(*args: str, **env: str) -> tuple[dict[str, list[int]], int]:
    """The page faults of each round, and how many malloc arenas the process had."""
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    arenas = len(re.findall(r"^Arena \d+:", result.stderr, re.MULTILINE))
    return json.loads(result.stdout.strip().splitlines()[-1]), arenas


def reused(rounds: list[int]) -> bool:
    """The last rounds fault almost nothing in (the first ones place the blocks)."""
    return min(rounds[-4:]) < PAGES // 10


def refaulted(rounds: list[int]) -> bool:
    return min(rounds) > PAGES * 9 // 10


def test_a_cpu_engine_reuses_a_freed_large_block(checkpoint):
    """Once a CPU engine is built, a large tensor freed and allocated again faults none of
    its pages in; without an engine, or with KVFLOW_MALLOC_UNMAP=1, every allocation
    faults all of them in."""
    model = str(checkpoint("llama-gqa"))
    assert reused(faults("engine", model)[0]["main"])
    assert refaulted(faults("none")[0]["main"])
    assert refaulted(faults("engine", model, KVFLOW_MALLOC_UNMAP="1")[0]["main"])


def test_kvflow_serve_asks_before_its_threads_take_a_malloc_arena(checkpoint):
    """The server loads and steps its engine on threads. A thread's own arena unmaps a heap
    it freed whole, so `kvflow serve` asks before any thread allocates, and its threads
    then share the main arena, which keeps freed blocks. A thread that allocates first
    makes an arena of its own."""
    result, arenas = faults("serve", str(checkpoint("llama-gqa")))
    assert reused(result["main"]) and arenas == 1, (result, arenas)
    _, arenas = faults("none")
    assert arenas > 1


def test_env_says_how_large_blocks_are_served(monkeypatch):
    from kvflow.bench.hardware import format_env, inventory
    from kvflow.worker import host_memory

    ceiling = {"device": "cpu", "threads": 2, "measured_at": "now",
               "dram_read_bytes_per_s": 1e10, "matmul_n": 8, "matmul_flops_per_s": {}}
    assert "large blocks: kept in glibc's heaps" in format_env(inventory(), ceiling)
    monkeypatch.setenv("KVFLOW_MALLOC_UNMAP", "1")
    assert host_memory.describe().startswith("mapped afresh")
