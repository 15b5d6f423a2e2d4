"""transformers `generate` as a peer, on the same token ids: one request at a time, or in
static batches (left-padded, each batch generating up to its longest output). Both are
credited only with each request's own output_len tokens; prefill is in the time."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from kvflow.bench.results import RunResult
from kvflow.bench.workload import Workload


def load_hf_model(model: str | Path, dtype: torch.dtype):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype).eval()


def run_transformers(hf_model, workload: Workload, batch_size: int) -> RunResult:  # noqa: ANN001
    pad = 0
    requests = workload.requests
    with torch.no_grad():
        hf_model.generate(torch.tensor([requests[0].prompt_token_ids[:32]]), max_new_tokens=4,
                          do_sample=False, pad_token_id=pad)
        start = time.perf_counter()
        for first in range(0, len(requests), batch_size):
            batch = requests[first:first + batch_size]
            width = max(len(r.prompt_token_ids) for r in batch)
            ids = torch.tensor([[pad] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids
                                for r in batch])
            mask = torch.tensor([[0] * (width - len(r.prompt_token_ids))
                                 + [1] * len(r.prompt_token_ids) for r in batch])
            new = max(r.output_len for r in batch)
            hf_model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=pad)
        seconds = time.perf_counter() - start
    name = "transformers one-at-a-time" if batch_size == 1 else "transformers static batch"
    return RunResult(system=name, workload=workload.name, num_requests=len(requests),
                     seconds=seconds,
                     prompt_tokens=workload.prompt_tokens,
                     generated_tokens=sum(r.output_len for r in requests),
                     settings={"batch_size": batch_size,
                               "dtype": str(hf_model.dtype).removeprefix("torch.")})
