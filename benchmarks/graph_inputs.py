"""The host's work to feed one graphed decode step (kvflow/worker/cuda_graphs.py): filling
the static buffers for N requests of a context C, with the requests' block tables kept
in persistent rows (what the runner does: a step writes only the blocks that changed)
against every row written again into them, and against the eager path's way
(attention/metadata.py: one table built from the requests' padded lists each step). Each round advances every
request by one token, so a request gains a block every block_size rounds, as in decode.
Medians in microseconds per step; on a GPU the copies go to the device, on the CPU they
are memory copies.

    .venv/bin/python benchmarks/graph_inputs.py [--requests 256] [--context 4096]
        [--device cuda] [--rounds 200]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvflow.bench.hardware import inventory
from kvflow.outputs import ScheduledRequest
from kvflow.sampling_params import SamplingParams
from kvflow.worker.cuda_graphs import DecodeBuffers

BLOCK_SIZE = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    width = args.max_model_len // BLOCK_SIZE
    params = SamplingParams()
    requests = [ScheduledRequest(f"r{i}", [7], args.context - 1,
                                 list(range(1 + i * width, 1 + i * width + args.context
                                            // BLOCK_SIZE)), True, params, [], [], frozenset())
                for i in range(args.requests)]
    results = {}
    for mode in ("persistent rows", "every row rewritten", "one table from lists"):
        buffers = DecodeBuffers(args.requests, width, device)
        times = []
        for _ in range(args.rounds):
            for request in requests:  # one more token each; a new block now and then
                request.num_computed_tokens += 1
                if request.num_computed_tokens // BLOCK_SIZE >= len(request.block_ids):
                    request.block_ids.append(request.block_ids[-1] + 1)
            if mode == "every row rewritten":
                buffers.tables.forget({r.req_id for r in requests})
            start = time.perf_counter()
            if mode == "one table from lists":
                longest = max(len(r.block_ids) for r in requests)
                table = torch.tensor([r.block_ids + [0] * (longest - len(r.block_ids))
                                      for r in requests], dtype=torch.int32)
                buffers.block_tables[:len(requests), :longest].copy_(table)
            else:
                buffers.fill(requests, args.requests, BLOCK_SIZE)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[mode] = round(statistics.median(times) * 1e6, 1)
    info = inventory()
    print(json.dumps({"cpu": f"{info['cpu']} ({info['cpu_id']})", "device": str(device),
                      "requests": args.requests, "context": args.context,
                      "microseconds per step": results}, indent=1))


if __name__ == "__main__":
    main()
