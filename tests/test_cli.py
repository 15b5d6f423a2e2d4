from __future__ import annotations

import subprocess
import sys

from kvflow import LLM, SamplingParams


def test_generate_prints_the_completion(checkpoint):
    path = str(checkpoint("llama-gqa"))
    result = subprocess.run(
        [sys.executable, "-m", "kvflow.cli", "generate", path, "--prompt", "class Stack:",
         "--max-tokens", "6", "--ignore-eos", "--dtype", "float32", "--device", "cpu",
         "--kv-cache-memory", "4MiB"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = LLM(path, dtype="float32", device="cpu", kv_cache_memory="4MiB").generate(
        "class Stack:", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    assert result.stdout == expected + "\n"


def test_generate_reports_bad_input(checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "kvflow.cli", "generate", str(checkpoint("llama-gqa")),
         "--prompt", "x", "--temperature", "-1", "--kv-cache-memory", "4MiB"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "temperature must be non-negative" in result.stderr


def test_engine_flags_include_the_prefix_cache_switch_and_lpm():
    import argparse

    from kvflow.engine.args import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args([])).enable_prefix_caching is True
    off = EngineArgs.from_cli_args(parser.parse_args(["--no-enable-prefix-caching",
                                              "--scheduling-policy", "lpm"]))
    assert off.enable_prefix_caching is False and off.scheduling_policy == "lpm"
    assert EngineArgs.from_cli_args(parser.parse_args(["--enable-prefix-caching"])).enable_prefix_caching


def test_vllm_spelled_engine_flags():
    import argparse

    import pytest

    from kvflow.engine.args import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["-tp", "1", "-pp", "1", "-dp", "1", "--max-model-len", "32k",
         "--kv-cache-memory-bytes", "64MiB", "--gpu-memory-utilization", "0.5",
         "--trust-remote-code", "--revision", "main", "--max-logprobs", "5"]))
    assert (args.max_model_len, args.kv_cache_memory, args.gpu_memory_utilization) == \
        (32000, 64 * 2**20, 0.5)
    assert args.trust_remote_code and args.revision == "main" and args.max_logprobs == 5
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["-tp", "4", "-n", "2", "-r", "1", "--master-addr", "10.0.0.1", "--master-port", "29500"]))
    assert args.parallel_config().local_ranks == range(2, 4)
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["-tp", "2", "-pp", "2", "-n", "2", "-r", "1", "--master-port", "29500"]))
    parallel = args.parallel_config()  # a stage a machine: node 1 holds stage 1
    assert parallel.local_ranks == range(2, 4) and parallel.stage_of(2) == 1
    assert EngineArgs.from_cli_args(parser.parse_args(["-dp", "2"])).data_parallel_size == 2
    with pytest.raises(ValueError, match="engine cores run on this machine only"):
        EngineArgs.from_cli_args(parser.parse_args(
            ["-dp", "2", "-tp", "2", "-n", "2", "--master-addr", "h", "--master-port", "1"]))
    with pytest.raises(ValueError, match="--master-port"):
        EngineArgs.from_cli_args(parser.parse_args(["-tp", "2", "--nnodes", "2"]))


def test_serve_help_names_every_kind_of_model():
    result = subprocess.run([sys.executable, "-m", "kvflow.cli", "serve", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for kind in ("checkpoint directory", "Hugging Face hub id", "GGUF file",
                 "built-in demo model"):
        assert text.count(kind) == 2, kind  # in the description and in MODEL's help
