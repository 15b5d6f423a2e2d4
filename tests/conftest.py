from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import build_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))

# Parity tests run on every device at hand; CI has only the CPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Without a GPU, Triton's kernels run under its interpreter (read when they are defined,
# so before any test imports them); with one, they compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
        key = (variant, repr(sorted(overrides.items())))  # repr: values may be lists
        if key not in cache:
            out = tmp_path_factory.mktemp(variant)
            cache[key] = build_checkpoint(out, variant, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def gguf_file(checkpoint, tmp_path_factory):
    """gguf_file(variant, recipe, **overrides) -> (GGUF path, its source checkpoint),
    written by kvflow/bench/gguf_export.py once per session."""
    from kvflow.bench.gguf_export import export_gguf

    cache = {}

    def make(variant: str, recipe: str, **overrides):
        key = (variant, recipe, repr(sorted(overrides.items())))
        if key not in cache:
            source = checkpoint(variant, **overrides)
            out = tmp_path_factory.mktemp("gguf") / f"{variant}-{recipe}.gguf"
            cache[key] = (export_gguf(source, out, recipe), source)
        return cache[key]

    return make


def checkpoint_with(source: Path, out: Path, tensors: dict[str, torch.Tensor],
                    config: dict | None = None) -> Path:
    """A copy of the checkpoint at `source` in the new directory `out` holding `tensors`
    as its weights, with `config`'s keys set in its config.json."""
    import json

    from safetensors.torch import save_file

    out.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            (out / file.name).write_bytes(file.read_bytes())
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if config:
        hf_config = json.loads((source / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**hf_config, **config}))
    return out


def rewrite_gguf(source, out, arch=None, tensor=None, extra=None, metadata=None):
    """A copy of a GGUF file with its architecture renamed, `tensor(name, array, type) ->
    (array, type)` applied to each tensor (None drops it), F32 tensors added, or metadata
    keys set to `{key: (value, GGUFValueType)}`."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    writer = GGUFWriter(str(out), arch or reader.get_field("general.architecture").contents())
    metadata = metadata or {}
    for field in reader.fields.values():
        if (field.name.startswith("GGUF.") or field.name == "general.architecture"
                or field.name in metadata):
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type)
    for key, (value, value_type) in metadata.items():
        writer.add_key_value(key, value, value_type)
    for t in reader.tensors:
        array, qtype = np.array(t.data), t.tensor_type
        if tensor is not None:
            changed = tensor(t.name, array, qtype)
            if changed is None:
                continue
            array, qtype = changed
        writer.add_tensor(t.name, array, raw_dtype=qtype)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


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


def generate_greedy(path, prompts: list[list[int]], params, **options):  # noqa: ANN001, ANN201
    """(the LLM, each prompt's generated token ids): float32, on the CPU with a 16 MiB KV
    pool unless `options` say otherwise."""
    from kvflow import LLM

    llm = LLM(str(path), dtype="float32",
              **{"device": "cpu", "kv_cache_memory": "16MiB", **options})
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outputs]


def without_decode_graphs(llm):  # noqa: ANN001, ANN201
    """The engine's decode steps run through the model's Python again, for tests that
    watch or change a layer during decode: a captured step replays its kernel calls as
    recorded (kvflow/worker/cpu_graphs.py), past hooks and later changes."""
    llm.engine.executor.runner.graphs = None
    return llm


def assert_no_leak(llm) -> None:  # noqa: ANN001
    """Every block back in the pool, and the pool's bookkeeping whole."""
    pool = llm.engine.kv_manager.pool
    pool.check_integrity()
    assert pool.num_free_blocks == pool.num_usable_blocks


def chunked_and_preempted(path, prompts: list[list[int]], params):  # noqa: ANN001, ANN201
    """generate_greedy with a token budget of 7, which splits every prompt into chunks, and
    a pool of about two requests' blocks, which forces preemption and recomputation; the
    test fails if nothing was preempted."""
    from kvflow.models.config import ModelConfig

    per_token = ModelConfig.from_pretrained(path).kv_bytes_per_token(torch.float32)
    longest = max(len(p) for p in prompts) + params.max_tokens
    blocks = 2 * (longest // 4 + 1) + 1
    llm, tokens = generate_greedy(path, prompts, params, block_size=4,
                                  max_num_batched_tokens=7,
                                  kv_cache_memory=blocks * 4 * per_token)
    assert llm.engine.scheduler.num_preemptions_total > 0
    return llm, tokens


def prompt_logprobs(path, max_tokens: int = 1, **options):  # noqa: ANN001, ANN201
    """(the LLM, for each of three random prompts the logprob of each of its tokens after
    the first), with an 8 MiB KV pool unless `options` say otherwise."""
    from kvflow import LLM, SamplingParams

    llm = LLM(str(path), device="cpu", **{"kv_cache_memory": "8MiB", **options})
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=11, low=20, high=30)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=0,
                            ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [torch.tensor([next(iter(e.values())).logprob for e in o.prompt_logprobs[1:]])
                 for o in outputs]


def scheduler_step(scheduler, token: int = 7):  # noqa: ANN001, ANN201
    """One scheduler step with no model: every request that samples gets `token`."""
    from kvflow.outputs import RunnerOutput

    out = scheduler.schedule()
    sampled = {s.req_id: [token] for s in out.scheduled if s.sample}
    scheduler.update_from_output(out, RunnerOutput(sampled_token_ids=sampled))
    return out
