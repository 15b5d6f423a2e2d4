"""Workload files (the format of ../shared/workloads/*.json) and the requests they draw.

For each request the lengths are drawn first, then its prompt ids, uniform in
[100, vocab - 100), all from numpy.random.default_rng(seed): every system is sent the same
token ids."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import kvflow


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


@dataclass(frozen=True)
class Workload:
    name: str
    spec: dict
    requests: list[BenchRequest]

    @property
    def single_stream(self) -> bool:
        """One request at a time, by the workload's definition."""
        return self.name == "single-stream" or bool(self.spec.get("single_stream"))

    @property
    def lengths(self) -> list[tuple[int, int]]:
        return [(len(r.prompt_token_ids), r.output_len) for r in self.requests]

    def prefix(self, count: int | None) -> "Workload":
        if count is None or count >= len(self.requests):
            return self
        if count < 1:
            raise ValueError(f"a workload prefix needs at least 1 request, got {count}")
        return Workload(self.name, self.spec, self.requests[:count])


def shared_dir() -> Path:
    """The team's shared files: $KVFLOW_SHARED, or `shared/` beside the repository."""
    env = os.environ.get("KVFLOW_SHARED")
    return Path(env) if env else Path(kvflow.__file__).resolve().parents[2] / "shared"


def resolve_named(value: str | Path, kind: str) -> Path:
    """A path as given, or a name from the shared `kind` folder (`mixed`, `qwen2.5-0.5b`)."""
    path = Path(value)
    if path.is_file():
        return path
    named = shared_dir() / kind / f"{path.name.removesuffix('.json')}.json"
    if named.is_file():
        return named
    known = sorted(p.stem for p in (shared_dir() / kind).glob("*.json"))
    raise ValueError(f"{value!r} is neither a file nor a name in {shared_dir() / kind} "
                     f"(known: {', '.join(known) or 'none'})")


def _draw(rng: np.random.Generator, spec: dict, field: str) -> int:
    low, high = spec[field]["uniform"]
    if not 1 <= low <= high:
        raise ValueError(f"workload field {field!r} needs 1 <= low <= high, got {[low, high]}")
    return int(rng.integers(low, high + 1))


def load_workload(path: str | Path, vocab_size: int) -> Workload:
    """A workload file, or a name from the shared workloads (`mixed`, `single-stream`)."""
    return workload_from_spec(json.loads(resolve_named(path, "workloads").read_text()),
                              vocab_size)


def workload_from_spec(spec: dict, vocab_size: int) -> Workload:
    if vocab_size <= 200:
        raise ValueError(f"prompt ids are drawn from [100, vocab - 100); vocab {vocab_size} is "
                         "too small")
    rng = np.random.default_rng(spec["seed"])
    shared: list[int] = []
    if "shared_prefix_len" in spec:
        shared = rng.integers(100, vocab_size - 100, spec["shared_prefix_len"]).tolist()
    requests = []
    for _ in range(spec["num_requests"]):
        prompt_len = _draw(rng, spec, "suffix_len" if shared else "prompt_len")
        output_len = _draw(rng, spec, "output_len")
        prompt = shared + rng.integers(100, vocab_size - 100, prompt_len).tolist()
        requests.append(BenchRequest(prompt_token_ids=prompt, output_len=output_len))
    return Workload(name=spec.get("name", "workload"), spec=spec, requests=requests)
