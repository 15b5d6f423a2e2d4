"""Requests of a ../shared/workloads/*.json file, drawn the same way for every system."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def _draw(rng: np.random.Generator, spec: dict) -> int:
    low, high = spec["uniform"]
    return int(rng.integers(low, high + 1))


def load_workload(path: str | Path, vocab_size: int) -> tuple[dict, list[BenchRequest]]:
    """For each request: its lengths, then its prompt ids, uniform in [100, vocab - 100)."""
    spec = json.loads(Path(path).read_text())
    rng = np.random.default_rng(spec["seed"])
    shared: list[int] = []
    if "shared_prefix_len" in spec:
        shared = rng.integers(100, vocab_size - 100, spec["shared_prefix_len"]).tolist()
    requests = []
    for _ in range(spec["num_requests"]):
        prompt_len = _draw(rng, spec["suffix_len"] if shared else spec["prompt_len"])
        output_len = _draw(rng, spec["output_len"])
        prompt = shared + rng.integers(100, vocab_size - 100, prompt_len).tolist()
        requests.append(BenchRequest(prompt_token_ids=prompt, output_len=output_len))
    return spec, requests
