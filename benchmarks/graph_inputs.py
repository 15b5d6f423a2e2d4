"""The host's work to feed one decode step of N requests of a context C, with the
requests' block tables kept in persistent rows (kvflow/worker/persistent_batch.py: a step
writes only the blocks that changed), against every row written again, and against one
table built from the requests' padded lists each step. Graphed steps fill the captured
buffers (kvflow/worker/cuda_graphs.py); eager steps build the attention metadata
(attention/metadata.py). Each round advances every request by one token, so a request
gains a block every block_size rounds, as in decode. Medians in microseconds per step; on
a GPU the copies go to the device, on the CPU they are memory copies.

    .venv/bin/python benchmarks/graph_inputs.py [--requests 256] [--context 4096]
        [--device cuda] [--rounds 200]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvflow.attention.metadata import build_metadata, padded_block_tables
from kvflow.bench.hardware import inventory
from kvflow.outputs import ScheduledRequest
from kvflow.sampling_params import SamplingParams
from kvflow.worker.cuda_graphs import DecodeBuffers
from kvflow.worker.persistent_batch import PersistentBlockTables

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
    results = {}
    modes = [(path, rows) for path in ("graphed", "eager")
             for rows in ("persistent rows", "every row rewritten", "one table from lists")]
    for path, rows in modes:
        requests = [ScheduledRequest(f"r{i}", [7], args.context - 1,
                                     list(range(1 + i * width,
                                                1 + i * width + args.context // BLOCK_SIZE)),
                                     True, SamplingParams(), [], [], frozenset())
                    for i in range(args.requests)]
        tables = PersistentBlockTables(width, device)
        buffers = DecodeBuffers(args.requests, [1], width, device)
        times = []
        for _ in range(args.rounds):
            for request in requests:  # one more token each; a new block now and then
                request.num_computed_tokens += 1
                if request.num_computed_tokens // BLOCK_SIZE >= len(request.block_ids):
                    request.block_ids.append(request.block_ids[-1] + 1)
            if rows == "every row rewritten":
                tables.forget({r.req_id for r in requests})
            start = time.perf_counter()
            if rows == "one table from lists":
                table = padded_block_tables([r.block_ids for r in requests], device)
                indices = list(range(args.requests))
                if path == "graphed":  # the captured buffers are max_model_len wide
                    table = torch.nn.functional.pad(table, (0, width - table.shape[1]))
            else:
                indices = tables.update(requests)
                table = tables.table
            if path == "graphed":
                buffers.fill(requests, args.requests, 1, BLOCK_SIZE, table, indices)
            else:
                build_metadata([1] * args.requests, [r.num_computed_tokens for r in requests],
                               tables.gather(indices, max(len(r.block_ids) for r in requests))
                               if rows != "one table from lists" else table,
                               BLOCK_SIZE, device, 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[f"{path}, {rows}"] = round(statistics.median(times) * 1e6, 1)
    info = inventory()
    print(json.dumps({"cpu": f"{info['cpu']} ({info['cpu_id']})", "device": str(device),
                      "requests": args.requests, "context": args.context,
                      "microseconds per step": results}, indent=1))


if __name__ == "__main__":
    main()
