"""Tensor and pipeline parallelism on one machine's CPUs: one rank with every core against
N tensor-parallel ranks and N pipeline stages with a share each, side by side.

    python benchmarks/tensor_parallel.py --model MODEL [--ranks 2] [--rounds 2]
        [--mixed-requests 128] [--out docs/benchmarks/DATE-tp.json]

Each round runs `kvflow bench latency` (single-stream decode) and `kvflow bench throughput
--workload mixed` once per configuration, alternating, each in a process of its own (rank
0 binds its thread to a core). Then, in this process, it times a decode with the N-rank
tensor-parallel engine's collectives wrapped, for the share of rank 0's step spent in them
(waiting for the slowest rank included), and reads the all-reduce timings the engine
measured at startup (gloo and shared memory, a hidden-size vector); and `mixed` through
the N-stage pipeline with rank 0's sends and its waits for the logits timed (a wait holds
the later stages' compute as well as the transfer).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvflow.worker.threads import default_num_threads


def _bench(kind: str, model: str, dtype: str, split: str, ranks: int, threads: int,
           args: list[str], folder: Path) -> dict:
    out = folder / f"{kind}-{split}{ranks}-{time.monotonic_ns()}.json"
    command = [sys.executable, "-m", "kvflow.cli", "bench", kind, "--model", model,
               "--dtype", dtype, "--threads", str(threads), f"-{split}", str(ranks),
               "--output", str(out), *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _timed(target: object, names: tuple[str, ...]) -> tuple[collections.Counter,
                                                            collections.Counter]:
    """Wraps target's methods `names` to add up their seconds and calls."""
    seconds: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for name in names:
        def timed(*args, _call=getattr(target, name), _name=name):  # noqa: ANN002, ANN202
            start = time.perf_counter()
            result = _call(*args)
            seconds[_name] += time.perf_counter() - start
            calls[_name] += 1
            return result
        setattr(target, name, timed)
    return seconds, calls


def _collective_share(model: str, dtype: str, ranks: int, threads: int,
                      output_len: int) -> dict:
    from kvflow import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, tensor_parallel_size=ranks, num_threads=threads)
    comm = llm.engine.executor.links.tp
    seconds, calls = _timed(comm, ("all_reduce", "all_gather", "broadcast"))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": list(range(100, 228))}], params, use_tqdm=False)
    seconds.clear()
    calls.clear()
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": list(range(300, 428))}], params, use_tqdm=False)
    total = time.perf_counter() - start
    llm.engine.shutdown()
    return {"communicator": type(comm).__name__,
            "startup_all_reduce_us": {k: v * 1e6 for k, v in comm.timings.items()},
            "decode_seconds": total,
            "collectives": {k: {"calls": calls[k], "seconds": seconds[k]} for k in seconds},
            "share_of_step": sum(seconds.values()) / total}


def _pipeline_waits(model: str, dtype: str, stages: int, threads: int,
                    requests: int) -> dict:
    from kvflow import LLM
    from kvflow.bench.offline import run_kvflow
    from kvflow.bench.workload import load_workload

    llm = LLM(model, dtype=dtype, pipeline_parallel_size=stages, num_threads=threads)
    workload = load_workload("mixed", llm.engine.model_config.vocab_size).prefix(requests)
    seconds, calls = _timed(llm.engine.executor.links.pipe, ("send", "recv"))
    total = run_kvflow(llm, workload).seconds
    llm.engine.shutdown()
    return {"seconds": total,
            "rank0": {k: {"calls": calls[k], "seconds": seconds[k]} for k in seconds},
            "send_share": seconds["send"] / total, "recv_wait_share": seconds["recv"] / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--mixed-requests", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args()
    cores = default_num_threads()
    threads = max(1, cores // ns.ranks)
    configs = [("tp", 1, cores), ("tp", ns.ranks, threads), ("pp", ns.ranks, threads)]
    decode: dict[str, list[float]] = collections.defaultdict(list)
    mixed: dict[str, list[float]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(ns.rounds):
            for split, ranks, threads in configs:
                name = f"{split}{ranks}"
                latency = _bench("latency", ns.model, ns.dtype, split, ranks, threads,
                                 ["--prompt-len", "128", "--output-len", str(ns.output_len),
                                  "--num-iters", "3"], Path(folder))
                decode[name].append(1000 / latency["latency"]["tpot"]["p50_ms"])
                throughput = _bench("throughput", ns.model, ns.dtype, split, ranks, threads,
                                    ["--workload", "mixed", "--num-requests",
                                     str(ns.mixed_requests)], Path(folder))
                mixed[name].append(throughput["total_tokens_per_s"])
                print(f"{name} x {threads} thread(s): decode {decode[name][-1]:.1f} tok/s, "
                      f"mixed {mixed[name][-1]:.1f} tok/s", flush=True)
    one, tp, pp = "tp1", f"tp{ns.ranks}", f"pp{ns.ranks}"
    result = {
        "model": ns.model, "dtype": ns.dtype, "cores": cores, "rounds": ns.rounds,
        "decode_tokens_per_s": dict(decode),
        "mixed_total_tokens_per_s": dict(mixed),
        **{f"{kind}_ratio_{name}": statistics.median(runs[name]) / statistics.median(runs[one])
           for kind, runs in (("decode", decode), ("mixed", mixed)) for name in (tp, pp)},
        "tp_collectives": _collective_share(ns.model, ns.dtype, ns.ranks, threads,
                                            ns.output_len),
        "pp_rank0_messages": _pipeline_waits(ns.model, ns.dtype, ns.ranks, threads,
                                             ns.mixed_requests),
    }
    print(json.dumps(result, indent=1))
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
