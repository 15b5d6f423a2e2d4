from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from checkpoints import build_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))

# Parity tests run on every device at hand; CI has only the CPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The native kernels as this machine builds them, and on x86 with AVX-512 turned off, so that
# the plain-loop paths that other CPUs compile are built and checked on every machine.
KERNEL_BUILDS = {"native": ()}
if platform.machine() in ("x86_64", "AMD64"):
    KERNEL_BUILDS["plain-loops"] = ("-mno-avx512f",)


@pytest.fixture(scope="session", params=sorted(KERNEL_BUILDS))
def kernel_ops(request):
    from kvflow.kernels import build

    module = build(KERNEL_BUILDS[request.param])
    assert module is not None, f"the {request.param} kernel build failed (see the log)"
    return module


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(variant, **overrides) -> a directory, built once per session."""
    cache: dict[tuple, Path] = {}

    def make(variant: str, **overrides) -> Path:
        key = (variant, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(variant)
            cache[key] = build_checkpoint(out, variant, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(path) -> the transformers model of a checkpoint, float32, built once."""
    from transformers import AutoModelForCausalLM

    cache: dict[Path, torch.nn.Module] = {}

    def load(path: Path) -> torch.nn.Module:
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return load


def random_prompts(count: int, seed: int = 0, low: int = 3, high: int = 40,
                   vocab: int = 384) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in lengths]


# kvflow's and transformers' float32 logits differ by about 1e-5 (they sum in other orders,
# and kvflow's kernels by the machine's ISA); a greedy step whose two best logits are closer
# than this may go either way on some CPU, and the tokens after it follow another path.
NEAR_TIE = 1e-3


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens up to its first near tie (NEAR_TIE), not past it."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    for step, logits in enumerate(out.logits):
        best, runner_up = logits[0].float().topk(2).values.tolist()
        if best - runner_up < NEAR_TIE:
            return tokens[:step]
    return tokens


def assert_greedy_matches(actual: list[list[int]], expected: list[list[int]],
                          max_new_tokens: int) -> None:
    """Each of kvflow's outputs equals transformers' (hf_greedy) as far as that goes, and
    near ties cut off no more than a quarter of the tokens compared."""
    assert len(actual) == len(expected)
    for tokens, reference in zip(actual, expected):
        assert len(tokens) == max_new_tokens
        assert tokens[:len(reference)] == reference
    assert sum(map(len, expected)) >= 0.75 * max_new_tokens * len(expected)


def scheduler_step(scheduler, token: int = 7):  # noqa: ANN001, ANN201
    """One scheduler step with no model: every request that samples gets `token`."""
    from kvflow.outputs import RunnerOutput

    out = scheduler.schedule()
    sampled = {s.req_id: [token] for s in out.scheduled if s.sample}
    scheduler.update_from_output(out, RunnerOutput(sampled_token_ids=sampled))
    return out
