"""`kvflow env`: what this machine is, and the two ceilings every roofline divides by.

The ceilings are measured, not looked up: the DRAM read rate (a sum over a 2 GiB fp32
tensor, so that no cache holds it, on the 2 MiB pages kvflow's weights sit on where the
system gives them: kvflow/worker/huge_pages.py) and the matmul rate of a 2048^3 product in bf16 and
fp32 (the faster of `a @ b` and `F.linear`), each the best of a few runs at a given thread
count. They are cached per machine, device, thread count and torch version, because
measuring takes seconds and every bench report needs them."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvflow.cache import cache_root, write_atomically
from kvflow.worker import host_memory, huge_pages
from kvflow.worker.kv_cache import CPU_FULL_SEQUENCES, CPU_KV_CAP, available_host_memory
from kvflow.worker.threads import ThreadGovernor, physical_cores

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
             "amx_int8", "fma", "f16c")
READ_BYTES = 2 << 30
MATMUL_N = 2048


def cpuinfo() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def inventory() -> dict:
    """Cores, ISA flags, memory and accelerator, as this process sees them."""
    cpu = cpuinfo()
    flags = set(cpu.get("flags", "").split())
    info = {
        "cpu": cpu.get("model name", platform.processor() or platform.machine()),
        # The model name alone does not tell Zen 4 from Zen 5 in a virtual machine.
        "cpu_id": f"{cpu.get('vendor_id', '?')} family {cpu.get('cpu family', '?')} "
                  f"model {cpu.get('model', '?')}",
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "memory_bytes": _memory_bytes(),
        "torch": torch.__version__,
        "physical_cores": physical_cores(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": None,
        "kv_cache_cap_bytes": min(CPU_KV_CAP, available_host_memory() // 4),
        "huge_pages": huge_pages.describe(),
        "large_blocks": host_memory.describe(),
        "native_kernels": _native_kernels(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {"name": props.name, "memory_bytes": props.total_memory,
                        "count": torch.cuda.device_count()}
    return info


def _native_kernels() -> str:
    """The vector paths of the native CPU kernels this process runs (built if need be)."""
    from kvflow.kernels import cpu_ops

    ops = cpu_ops()
    if ops is None:
        return "none (the PyTorch path; the log says why)"
    paths = ops.vector_paths()
    return paths + (" (bf16 attention on AMX tiles)" if paths.endswith("+amx") else "")


def _best_seconds(fn, device: str, repeats: int) -> float:  # noqa: ANN001
    for _ in range(2):  # warm-up: first-touch page faults, kernel selection, clocks
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def read_rate(device: str = "cpu", read_bytes: int = READ_BYTES, repeats: int = 10) -> float:
    """DRAM (or HBM) read bytes/s at torch's thread count, the best of `repeats` sums. The
    cached ceiling is an hour's; `kvflow bench compare` measures this beside each decode
    test instead, since a shared host's read rate moves by half within minutes."""
    data = torch.empty(read_bytes // 4, dtype=torch.float32, device=device)
    huge_pages.advise([data])
    data.fill_(1)
    return read_bytes / _best_seconds(data.sum, device, repeats)


def matmul_flops(device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 matmul_n: int = MATMUL_N, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in dtype at torch's thread count, the best of `repeats`.
    `kvflow bench compare` measures it beside each prefill test, as read_rate beside a
    decode."""
    a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    # a @ b and F.linear(a, b) (the engine's form, b transposed) can take different
    # kernels; the ceiling is the faster.
    seconds = min(_best_seconds(lambda: a @ b, device, repeats),
                  _best_seconds(lambda: F.linear(a, b), device, repeats))
    return 2 * matmul_n ** 3 / seconds


def measure_ceilings(device: str = "cpu", read_bytes: int = READ_BYTES,
                     matmul_n: int = MATMUL_N, repeats: int = 10) -> dict:
    """DRAM (or HBM) read bytes/s and matmul FLOP/s per dtype, at torch's thread count."""
    read = read_rate(device, read_bytes, repeats)
    # float16 has no fast CPU path here; it is measured where it is a serving dtype.
    dtypes = (torch.bfloat16, torch.float32) + ((torch.float16,) if device == "cuda" else ())
    matmul = {str(dtype).removeprefix("torch."): matmul_flops(device, dtype, matmul_n, repeats)
              for dtype in dtypes}
    return {"device": device, "threads": torch.get_num_threads(),
            "dram_read_bytes_per_s": read, "read_bytes": read_bytes,
            "matmul_flops_per_s": matmul, "matmul_n": matmul_n,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def ceilings_path(device: str, threads: int | None = None) -> Path:
    """Where the ceilings of this machine, device and thread count (torch's, by default)
    are cached."""
    info = inventory()
    name = info["cuda"]["name"] if device == "cuda" and info["cuda"] else info["cpu"]
    threads = torch.get_num_threads() if threads is None else threads
    # "linear": ceilings since the matmul rate also tries F.linear; "huge": since the read
    # rate is measured on huge pages. Older caches are stale.
    key = f"{name}|{device}|{threads}|{torch.__version__}|linear|huge"
    return cache_root() / "env" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def cached_ceilings(device: str) -> dict | None:
    """The ceilings `kvflow env` measured for this machine, device and thread count, or None:
    a server reads them, never measures them (seconds of work and a 2 GiB tensor)."""
    path = ceilings_path(device)
    return json.loads(path.read_text()) if path.exists() else None


def ceilings(device: str = "cpu", refresh: bool = False) -> dict:
    """The cached ceilings for this machine, device and thread count; measured if absent."""
    path = ceilings_path(device)
    if path.exists() and not refresh:
        return json.loads(path.read_text())
    measured = measure_ceilings(device)
    write_atomically(path, json.dumps(measured, indent=1))
    return measured


def matmul_rate(ceiling: dict, dtype: str) -> float:
    rates = ceiling["matmul_flops_per_s"]
    if dtype not in rates:
        raise ValueError(f"no measured matmul rate for dtype {dtype!r}; have {sorted(rates)}")
    return rates[dtype]


def threads_now(max_threads: int, seconds: float = 0.5) -> dict | None:
    """The thread count the engine's ThreadGovernor would run on now, from the cores other
    processes kept busy over `seconds`; None where it cannot measure."""
    governor = ThreadGovernor(max_threads, interval_s=seconds, set_threads=lambda n: None)
    if not governor.active:
        return None
    time.sleep(seconds)
    return {"threads": governor.poll(), "others_busy_cores": round(governor.others, 2)}


def _threads_now(now: dict | None) -> str:
    if now is None:
        return "; fixed (no /proc to watch other processes' load)"
    return (f"; fewer while other processes keep cores busy: now {now['threads']}, with "
            f"{now['others_busy_cores']:.1f} cores busy beside")


def format_env(info: dict, ceiling: dict) -> str:
    isa = " ".join(flag for flag, present in info["isa"].items() if present) or "none found"
    memory = f"{info['memory_bytes'] / 2**30:.1f} GiB" if info["memory_bytes"] else "unknown"
    lines = [f"cpu: {info['cpu']} ({info.get('cpu_id', '?')})",
             f"cores: {info['usable_cores']} usable of {info['logical_cores']} logical, "
             f"{info['physical_cores']} physical",
             f"threads: {info['torch_threads']} (kvflow's default: one per physical core)"
             + _threads_now(info.get("threads_now")),
             f"isa: {isa}", f"memory: {memory}",
             f"memory pages: {info.get('huge_pages', 'unknown')}",
             f"large blocks: {info.get('large_blocks', 'unknown')}",
             f"native CPU kernels: {info.get('native_kernels', 'unknown')}",
             f"default KV cache on the CPU: room for {CPU_FULL_SEQUENCES} sequences of "
             f"max_model_len, at most {info['kv_cache_cap_bytes'] / 2**30:.2f} GiB "
             "(min(4 GiB, 1/4 of available RAM); --kv-cache-memory overrides)",
             f"accelerator: {info['cuda']['name'] if info['cuda'] else 'none'}",
             f"torch {info['torch']}, python {info['python']}",
             f"ceilings ({ceiling['device']}, {ceiling['threads']} threads, "
             f"measured {ceiling['measured_at']}):",
             f"  read bandwidth: {ceiling['dram_read_bytes_per_s'] / 1e9:.1f} GB/s",
             *(f"  {dtype} matmul {ceiling['matmul_n']}^3: {rate / 1e12:.3f} TFLOP/s"
               for dtype, rate in ceiling["matmul_flops_per_s"].items())]
    return "\n".join(lines)
