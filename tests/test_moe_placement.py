"""Experts on the host CPU, the rest on the model's device (--cpu-moe, --n-cpu-moe;
kvflow/layers/moe_placement.py).

Without a GPU the flags change nothing, and say so. The split itself (experts built on
their own device, inputs staged there, outputs brought back, the shared expert queued
between) is run here by a test-only placement on the CPU, which must give the tokens of
the unsplit model; on a machine with CUDA the same comparison runs across the devices."""
from __future__ import annotations

import logging

import pytest
import torch

import kvflow.executor.base as executor_base
from checkpoints import MOE_VARIANTS
from conftest import generate_greedy, random_prompts
from kvflow import LLM, EngineArgs, SamplingParams
from kvflow.layers.moe_placement import ExpertPlacement, HostExperts
from kvflow.models.blocks import SparseMoeBlock

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _generate(path, **options):
    return generate_greedy(path, random_prompts(4, seed=3, low=20, high=40), GREEDY, **options)


def _placed(llm: LLM) -> list[int]:
    """The decoder layers whose experts are placed."""
    return [i for i, layer in enumerate(llm.engine.runner.model.model.layers)
            for block in layer.modules()
            if isinstance(block, SparseMoeBlock) and block.host is not None]


def _expert_layers(llm: LLM) -> list[int]:
    return [i for i, layer in enumerate(llm.engine.runner.model.model.layers)
            if any(isinstance(m, SparseMoeBlock) for m in layer.modules())]


@pytest.mark.parametrize("options,message", [
    (dict(cpu_moe=True, n_cpu_moe=1), "alternatives; give one of them"),
    (dict(n_cpu_moe=-1), "n_cpu_moe must be at least 0, got -1")])
def test_bad_placement_flags_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model="unused", **options)


def test_the_flags_change_nothing_on_the_cpu_and_say_so(checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="kvflow.layers.moe_placement")
    path = checkpoint("qwen3-moe")
    _, expected = _generate(path)
    for flags in (dict(cpu_moe=True), dict(n_cpu_moe=2)):
        llm, tokens = _generate(path, **flags)
        assert tokens == expected and not _placed(llm)
    assert "--cpu-moe: the model runs on the CPU already; nothing to place" in caplog.text
    assert "--n-cpu-moe 2: the model runs on the CPU already" in caplog.text
    _generate(checkpoint("llama-gqa"), cpu_moe=True)
    assert "--cpu-moe: the model has no expert layers; nothing to place" in caplog.text


@pytest.mark.parametrize("family", ["qwen2-moe", "qwen3-moe"])
@pytest.mark.parametrize("num_layers", [None, 0, 1, 3])
def test_the_split_path_gives_the_unsplit_tokens(family, num_layers, checkpoint,
                                                 monkeypatch):
    """Qwen2-MoE: experts on layers 1 and 3 (decoder_sparse_step 2) with a shared expert,
    queued between the staging and the placed experts; Qwen3-MoE: layer 1 dense."""
    assert family in MOE_VARIANTS
    path = checkpoint(family)
    reference, expected = _generate(path)
    staged = []
    stage = HostExperts.stage
    monkeypatch.setattr(HostExperts, "stage",
                        lambda self, *args: staged.append(1) or stage(self, *args))
    # A test-only placement: experts "on the host" of a model that is on the host too, so
    # that the split path runs where no GPU is.
    monkeypatch.setattr(executor_base, "expert_placement",
                        lambda *_: ExpertPlacement(torch.device("cpu"), num_layers))
    llm, tokens = _generate(path)
    assert tokens == expected
    layers = _expert_layers(reference)
    assert _placed(llm) == [i for i in layers if num_layers is None or i < num_layers]
    assert bool(staged) == bool(_placed(llm))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("flags", [dict(cpu_moe=True), dict(n_cpu_moe=2)])
def test_experts_on_the_host_beside_a_gpu(flags, checkpoint):
    path = checkpoint("qwen2-moe")
    _, expected = _generate(path, device="cuda")
    llm, tokens = _generate(path, device="cuda", **flags)
    assert tokens == expected
    for block in llm.engine.runner.model.modules():
        if isinstance(block, SparseMoeBlock) and block.host is not None:
            assert block.experts.gate_up_proj.device.type == "cpu"
            assert block.gate.weight.device.type == "cuda"
    assert _placed(llm)
