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
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def shared_prefix_len(self) -> int:
        """Tokens at the start of every prompt that are the same for all requests."""
        return int(self.spec.get("shared_prefix_len", 0))

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


def _int_field(spec: dict, field: str, minimum: int) -> int:
    value = spec.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"workload field {field!r} must be an integer >= {minimum}, "
                         f"got {value!r}")
    return value


def _range_field(spec: dict, field: str) -> tuple[int, int]:
    bounds = (spec.get(field) or {}).get("uniform") if isinstance(spec.get(field), dict) else None
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
            or not 1 <= bounds[0] <= bounds[1]):
        raise ValueError(f"workload field {field!r} must be {{\"uniform\": [low, high]}} with "
                         f"integers 1 <= low <= high, got {spec.get(field)!r}")
    return bounds[0], bounds[1]


def load_workload(path: str | Path, vocab_size: int) -> Workload:
    """A workload file, or a name from the shared workloads (`mixed`, `single-stream`)."""
    resolved = resolve_named(path, "workloads")
    try:
        spec = json.loads(resolved.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{resolved} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise ValueError(f"{resolved}: a workload is a JSON object")
    return workload_from_spec(spec, vocab_size)


def workload_from_spec(spec: dict, vocab_size: int) -> Workload:
    if vocab_size <= 200:
        raise ValueError(f"prompt ids are drawn from [100, vocab - 100); vocab {vocab_size} is "
                         "too small")
    rng = np.random.default_rng(_int_field(spec, "seed", 0))
    count = _int_field(spec, "num_requests", 1)
    has_prefix = "shared_prefix_len" in spec
    prompt_range = _range_field(spec, "suffix_len" if has_prefix else "prompt_len")
    output_range = _range_field(spec, "output_len")
    shared: list[int] = []
    if has_prefix:
        shared = rng.integers(100, vocab_size - 100,
                              _int_field(spec, "shared_prefix_len", 0)).tolist()
    requests = []
    for _ in range(count):
        prompt_len = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
        output_len = int(rng.integers(output_range[0], output_range[1] + 1))
        prompt = shared + rng.integers(100, vocab_size - 100, prompt_len).tolist()
        requests.append(BenchRequest(prompt_token_ids=prompt, output_len=output_len))
    return Workload(name=str(spec.get("name", "workload")), spec=spec, requests=requests)
