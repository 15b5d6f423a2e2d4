"""Weights and the KV cache on 2 MiB pages (kvflow/worker/huge_pages.py)."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvflow import LLM
from kvflow.layers.linear import Linear
from kvflow.worker import huge_pages
from kvflow.worker.huge_pages import HUGE_PAGE

MiB = 2**20


collapsing = pytest.mark.skipif(
    not (huge_pages.enabled() and huge_pages._kernel_version() >= (6, 1)),
    reason="needs Linux 6.1 or later (MADV_COLLAPSE) with transparent huge pages not 'never'")


def huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def interior(tensor: torch.Tensor) -> tuple[int, int]:
    (start, length), = huge_pages._interiors([tensor])
    return start, length


def test_only_the_aligned_interior_of_each_storage_is_asked_for():
    big = torch.empty(5 * MiB, dtype=torch.uint8)
    start, length = interior(big)
    assert start % HUGE_PAGE == 0 and length % HUGE_PAGE == 0 and length >= 2 * MiB
    assert big.data_ptr() <= start and start + length <= big.data_ptr() + big.numel()
    # A view of the same storage is the same range, once; a small tensor has none.
    assert huge_pages._interiors([big, big[MiB:], torch.empty(MiB, dtype=torch.uint8)]) == [
        (start, length)]
    assert huge_pages._interiors([torch.empty(8 * MiB, dtype=torch.uint8, device="meta")]) == []


def test_every_tensor_a_model_keeps_is_found():
    @dataclass(frozen=True)
    class Plan:
        copy: torch.Tensor
        pair: tuple[torch.Tensor, torch.Tensor | None]

    layer = torch.nn.Linear(4, 4)
    copy, first = torch.zeros(3), torch.zeros(2)
    layer.plan = Plan(copy, (first, None))
    layer.held = [torch.ones(1)]
    model = torch.nn.Sequential(layer)
    model.register_buffer("table", torch.zeros(5))
    found = {t.data_ptr() for t in huge_pages.tensors_of(model)}
    expected = [layer.weight, layer.bias, model.table, copy, first, layer.held[0]]
    assert found == {t.data_ptr() for t in expected}


@collapsing
def test_a_written_tensor_is_collapsed_in_place():
    data = torch.arange(3 * 2**20, dtype=torch.float32)  # 12 MiB, on small pages
    address = data.data_ptr()
    result = huge_pages.collapse([data])
    start, length = interior(data)
    assert result.error is None and result.huge == result.asked == length
    assert huge_bytes_at(start) >= length
    assert data.data_ptr() == address
    assert torch.equal(data, torch.arange(3 * 2**20, dtype=torch.float32))


def test_turned_off_it_asks_for_nothing_and_says_why(monkeypatch):
    monkeypatch.setenv("KVFLOW_NO_HUGE_PAGES", "1")
    data = torch.ones(3 * 2**20)
    assert huge_pages.advise([data]) == 0
    result = huge_pages.collapse([data])
    assert result.huge == 0 and "KVFLOW_NO_HUGE_PAGES" in (result.error or "")
    assert "KVFLOW_NO_HUGE_PAGES" in huge_pages.describe()


def test_parameters_are_gathered_into_one_block_keeping_their_values(monkeypatch):
    if not huge_pages.enabled():
        pytest.skip("transparent huge pages are off here")
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.LayerNorm(1024),
                                torch.nn.Linear(1024, 7, bias=False))
    tied = torch.nn.Linear(1024, 7, bias=False)
    tied.weight = model[2].weight  # one parameter, two owners
    model.append(tied)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    identity = {name: id(p) for name, p in model.named_parameters()}
    moved = huge_pages.gather(model.parameters())
    params = dict(model.named_parameters())
    assert moved >= sum(p.numel() * p.element_size() for p in params.values())
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == 1
    assert all(p.data_ptr() % huge_pages.ALIGNMENT == 0 for p in params.values())
    assert {name: id(p) for name, p in params.items()} == identity
    for name, p in params.items():
        assert torch.equal(p, before[name]), name
    assert model[3].weight is model[2].weight

    monkeypatch.setenv("KVFLOW_NO_HUGE_PAGES", "1")
    alone = torch.nn.Linear(1024, 1024)
    address = alone.weight.data_ptr()
    assert huge_pages.gather(alone.parameters()) == 0 and alone.weight.data_ptr() == address


# Run in a process of its own: once an engine has run on the CPU, glibc keeps freed large
# blocks (kvflow/worker/host_memory.py), and a new one may reuse pages already written.
_NEVER_WRITTEN = """
import torch
from kvflow.worker import huge_pages

fresh = torch.nn.Parameter(torch.empty(16 * 2**20), requires_grad=False)  # 64 MiB
filled = torch.nn.Parameter(torch.full((16 * 2**20,), 3.0), requires_grad=False)
assert not huge_pages.written(fresh) and huge_pages.written(filled)
marked = torch.empty(16 * 2**20)
marked[8 * 2**20] = 1.0
assert huge_pages.written(marked)
assert huge_pages.written(torch.empty(10))  # too small to tell: copied
huge_pages.gather([fresh, filled])
assert not huge_pages.written(fresh)  # still untouched, in the block
assert bool((filled == 3.0).all())
assert fresh.untyped_storage().data_ptr() == filled.untyped_storage().data_ptr()
"""


def test_a_parameter_never_written_is_not_copied():
    """Above glibc's largest mmap threshold (32 MiB) a new process's allocation is fresh
    memory: its pages are touched only when written, and pagemap says which were."""
    if not huge_pages.enabled():
        pytest.skip("transparent huge pages are off here")
    run = subprocess.run([sys.executable, "-c", _NEVER_WRITTEN], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


def spans(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The 2 MiB-aligned part of a tensor's own bytes, or None."""
    first, last = huge_pages._within(
        tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size(), HUGE_PAGE)
    return (first, last - first) if last > first else None


@collapsing
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_an_engines_weights_and_kv_cache_are_on_huge_pages(checkpoint, quantization):
    """Every tensor of the model that spans a huge page (parameters, the kernels' copies in
    their plans) and the KV cache, once the engine is up; the parameters, small ones
    included, in one block."""
    path = checkpoint("llama-gqa", dtype="bfloat16", hidden_size=512, intermediate_size=4096,
                      num_attention_heads=4, num_key_value_heads=2)
    llm = LLM(model=str(path), kv_cache_memory="64MiB", quantization=quantization,
              quantization_group_size=32)
    model = llm.engine.runner.model
    params = list(model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    small = min(params, key=lambda p: p.numel())
    assert huge_bytes_at(small.data_ptr()) > 0
    tensors = [t for t in huge_pages.tensors_of(model) if t.layout == torch.strided]
    if quantization:
        copies = [t for m in model.modules() if isinstance(m, Linear)
                  for t in getattr(m.plan, "weights", ())]
        assert copies and all(any(c is t for t in tensors) for c in copies)
    k_cache = model.attention_layers()[0].k_cache
    ranges = [r for t in tensors + [k_cache] if (r := spans(t)) is not None]
    assert ranges
    for start, length in ranges:
        assert huge_bytes_at(start) >= length, f"{length} bytes at {start:#x} on small pages"


def test_env_says_what_pages_weights_sit_on():
    from kvflow.bench.hardware import format_env, inventory

    text = format_env(inventory(), {"device": "cpu", "threads": 2, "measured_at": "now",
                                    "dram_read_bytes_per_s": 1e10, "matmul_n": 8,
                                    "matmul_flops_per_s": {}})
    assert f"memory pages: {huge_pages.describe()}" in text
