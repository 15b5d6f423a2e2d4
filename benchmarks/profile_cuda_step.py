"""Where a single-stream decode step's time goes on CUDA: host time per step against the time
the GPU is busy, and the operators that launch the most kernels.

    python benchmarks/profile_cuda_step.py --model PATH [--steps 20]

A step whose GPU-busy time is a small part of its wall time is bound by kernel launches
and Python, not by the GPU (docs/benchmarks.md, the first H100 measurement).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvflow import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")

    engine = LLM(model=args.model, device="cuda", kv_cache_memory="4GiB").engine
    params = SamplingParams(max_tokens=3 * args.steps + 10, ignore_eos=True, temperature=0)
    engine.add_request("profiled", {"prompt_token_ids": list(range(100, 100 + args.prompt_len))},
                       params)
    for _ in range(args.steps):  # prefill and warm-up
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / args.steps * 1000

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / args.steps / 1000
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20,
                                    max_name_column_width=50))
    print(f"{torch.cuda.get_device_name()}: {wall_ms:.1f} ms per decode step, GPU busy "
          f"{busy_ms:.2f} ms ({100 * busy_ms / wall_ms:.0f}%), "
          f"{len(kernels) / args.steps:.0f} kernels per step")


if __name__ == "__main__":
    main()
