"""kvflow bench: workloads, the roofline arithmetic, make-model, env and the load
generator against a real server. No timing assertions: only that every figure is there
and consistent with the requests sent."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from checkpoints import BASE, MOE_VARIANTS, VARIANTS
from kvflow.bench import hardware
from kvflow.bench.roofline import ModelCost, roofline, run_cost, step_cost
from kvflow.bench.workload import load_workload, resolve_named, workload_from_spec
from server_process import ServerProcess

SHARED = Path(__file__).resolve().parents[2] / "shared"
QWEN_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "vocab_size": 151936, "tie_word_embeddings": True}
SPEC = {"name": "t", "seed": 7, "num_requests": 5, "prompt_len": {"uniform": [3, 9]},
        "output_len": {"uniform": [2, 4]}}


@pytest.fixture(autouse=True)
def small_ceilings(monkeypatch, tmp_path):
    """Measure the real ceilings, on small sizes, into a private cache; the kernels this
    machine built are linked in (building them again took 45 s in every test that ran an
    engine)."""
    from kvflow.cache import cache_root

    private = tmp_path / "cache"
    private.mkdir()
    (cache_root() / "kernels").mkdir(parents=True, exist_ok=True)
    (private / "kernels").symlink_to(cache_root() / "kernels")
    monkeypatch.setenv("KVFLOW_CACHE", str(private))
    measure = hardware.measure_ceilings
    monkeypatch.setattr(hardware, "measure_ceilings",
                        lambda device="cpu": measure(device, read_bytes=16 << 20, matmul_n=128,
                                                     repeats=2))
    read = hardware.read_rate
    monkeypatch.setattr(hardware, "read_rate",
                        lambda device="cpu", read_bytes=64 << 20, repeats=2:
                        read(device, read_bytes, repeats))
    matmul = hardware.matmul_flops
    monkeypatch.setattr(hardware, "matmul_flops",
                        lambda device="cpu", dtype=torch.bfloat16, matmul_n=128, repeats=2:
                        matmul(device, dtype, matmul_n, repeats))


def test_workload_draws_the_same_requests_for_the_same_seed():
    first, again = workload_from_spec(SPEC, 1000), workload_from_spec(SPEC, 1000)
    assert first.requests == again.requests
    other = workload_from_spec({**SPEC, "seed": 8}, 1000)
    assert other.requests != first.requests
    for request in first.requests:
        assert 3 <= len(request.prompt_token_ids) <= 9 and 2 <= request.output_len <= 4
        assert all(100 <= t < 900 for t in request.prompt_token_ids)
    assert first.prefix(2).requests == first.requests[:2]
    with pytest.raises(ValueError, match="vocab 150"):
        workload_from_spec(SPEC, 150)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared workloads")
def test_shared_workloads_by_name_and_prefix():
    mixed = load_workload("mixed", 32000)
    assert len(mixed.requests) == 128 and not mixed.single_stream
    assert mixed.requests == load_workload(SHARED / "workloads" / "mixed.json", 32000).requests
    assert load_workload("single-stream", 32000).single_stream
    shared = load_workload("shared-prefix", 32000)
    prefix = shared.requests[0].prompt_token_ids[:1024]
    assert all(r.prompt_token_ids[:1024] == prefix for r in shared.requests)
    with pytest.raises(ValueError, match="neither a file nor a name"):
        resolve_named("no-such-workload", "workloads")


def test_roofline_arithmetic_for_qwen2_5_0_5b():
    cost = ModelCost.from_config(QWEN_05B, dtype_bytes=2)
    # Per layer: q 896*896 + k,v 2*896*128 + o 896*896 + mlp 3*896*4864 + 2 norms of 896
    # + q,k,v biases 896 + 2*128 = 14,912,384; 24 layers and the final norm.
    assert cost.non_embedding_params == 24 * 14_912_384 + 896 == 357_898_112
    assert cost.weight_bytes == 2 * (357_898_112 + 151936 * 896)  # tied: embedding once
    assert cost.attention_flops_per_attended_token == 4 * 14 * 64 * 24
    assert cost.lm_head_flops == 2 * 896 * 151936
    assert cost.kv_bytes_per_token == 2 * 24 * 128 * 2
    # One request, prompt 3, output 2: it processes 4 tokens attending 1..4 tokens; one
    # decode step reads the KV of 4 tokens; one wave of 2 steps reads the weights twice.
    run = run_cost(cost, [(3, 2)], concurrency=1)
    assert run.flops == 4 * 2 * 357_898_112 + 86_016 * (1 + 2 + 3 + 4) + 2 * 272_269_312
    assert run.bytes == 2 * cost.weight_bytes + 4 * 12_288
    # Two requests together share the weight reads: max(2, 3) steps.
    both = run_cost(cost, [(3, 2), (1, 3)], concurrency=2)
    assert both.bytes == 3 * cost.weight_bytes + (4 + 2 + 3) * 12_288
    # A shared prefix of 2 is computed once: the second request computes positions 2 and 3
    # of its 4 (attending 3 and 4 tokens); the bytes read do not change.
    shared = run_cost(cost, [(3, 2), (3, 2)], concurrency=2, shared_prefix_len=2)
    assert shared.flops == run.flops + 2 * 2 * 357_898_112 + 86_016 * (3 + 4) + 2 * 272_269_312
    assert shared.bytes == run_cost(cost, [(3, 2), (3, 2)], concurrency=2).bytes
    # One engine step of those 4 tokens, sampling once: the weights and the KV of 4 tokens.
    step = step_cost(cost, num_tokens=4, num_attended=10, num_context_tokens=4, num_logits=1)
    assert step.flops == 4 * 2 * 357_898_112 + 86_016 * 10 + 272_269_312
    assert step.bytes == cost.weight_bytes + 4 * 12_288
    line = roofline(run, seconds=2.0, matmul_flops_per_s=1e12, dram_bytes_per_s=1e10)
    assert line.binding == "memory"
    assert line.achieved_percent == pytest.approx(100 * run.bytes / 1e10 / 2.0)


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-mha-tied-bias", "qwen2", "qwen3"])
def test_model_cost_counts_the_parameters_transformers_has(variant):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**BASE, **VARIANTS[variant]}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    cost = ModelCost.from_config({**BASE, **VARIANTS[variant]}, dtype_bytes=4)
    assert cost.weight_bytes == 4 * total


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_model_cost_of_a_mixture_of_experts(variant):
    """The weights every token uses and the routed experts together are transformers'
    parameters; a token alone reads k experts of each expert layer, a long prefill nearly
    all, and a decode step of a run as many as its requests reach."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**BASE, **VARIANTS[variant]}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    cost = ModelCost.from_config({**BASE, **VARIANTS[variant]}, dtype_bytes=4)
    k, experts = cost.experts_per_token, cost.num_experts
    assert cost.weight_bytes + experts * cost.expert_bytes == 4 * total
    assert cost.expert_bytes == 4 * cost.expert_params
    assert cost.non_embedding_params == (cost.weight_bytes // 4 - config.vocab_size
                                         * config.hidden_size * (1 + (not config.tie_word_embeddings))
                                         + k * cost.expert_params)
    assert cost.active_experts(1) == pytest.approx(k)
    assert cost.active_experts(512) == pytest.approx(experts)
    assert cost.step_weight_bytes(1) == cost.weight_bytes + k * cost.expert_bytes
    # One request, prompt 3, output 2: its prefill step reaches 3 tokens' experts, its
    # decode step one token's.
    run = run_cost(cost, [(3, 2)], concurrency=1)
    assert run.bytes == pytest.approx(cost.step_weight_bytes(3) + cost.step_weight_bytes(1)
                                      + 4 * cost.kv_bytes_per_token)


def test_make_model_writes_a_checkpoint_llm_loads(tmp_path):
    from kvflow import LLM, SamplingParams
    from kvflow.bench.make_model import make_model, tokenizer_vocab_size

    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({**BASE, **VARIANTS["qwen2"], "vocab_size": 1024}))
    out = make_model(shape, tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 1024 and config["hidden_size"] == 64
    assert 200 < tokenizer_vocab_size(out) <= 1024
    llm = LLM(str(out), kv_cache_memory="16MiB")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    assert len(llm.generate({"prompt_token_ids": [5, 6, 7]}, params,
                            use_tqdm=False)[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="not empty"):
        make_model(shape, out)


def test_env_reports_inventory_and_caches_measured_ceilings(capsys):
    from kvflow.cli import main

    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "read bandwidth" in text and "bfloat16 matmul" in text
    first = hardware.ceilings()
    assert first["dram_read_bytes_per_s"] > 0 and first["matmul_flops_per_s"]["float32"] > 0
    assert hardware.ceilings() == first  # from the cache, not measured again


def test_bench_serve_against_a_real_server(checkpoint, tmp_path):
    from kvflow.cli import main

    model = checkpoint("llama-gqa")
    workload = tmp_path / "w.json"
    workload.write_text(json.dumps({**SPEC, "num_requests": 6,
                                    "output_len": {"uniform": [3, 6]}}))
    server = ServerProcess(model, "--kv-cache-memory", "16MiB", log=tmp_path / "server.log")
    try:
        server.wait_ready()
        out = tmp_path / "serve.json"
        # The server lists the checkpoint by its directory's name, not its path.
        assert main(["bench", "serve", "--base-url", server.url, "--workload", str(workload),
                     "--max-concurrency", "3", "--slo-ttft-ms", "60000", "--slo-tpot-ms",
                     "60000", "--dtype", "float32", "--output", str(out),
                     "--model-path", str(model)]) == 0
        result = json.loads(out.read_text())
        expected = workload_from_spec(json.loads(workload.read_text()), 384)
        assert result["num_requests"] == 6 and result["latency"]["failed"] == 0
        assert result["generated_tokens"] == sum(r.output_len for r in expected.requests)
        assert result["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in expected.requests)
        for metric in ("ttft", "tpot", "e2e"):
            stats = result["latency"][metric]
            assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
        # A stream sends what is ready when the client reads, so a fast server may send a short
        # output in one chunk: only tokens after a request's first chunk have a gap to measure.
        itl = result["latency"]["itl"]
        assert len(result["latency"]["itl_samples_ms"]) == itl.get("count", 0)
        assert itl.get("count", 0) <= result["generated_tokens"] - result["num_requests"]
        if itl:
            assert 0 <= itl["p50_ms"] <= itl["p90_ms"] <= itl["p99_ms"]
        assert result["latency"]["goodput_requests_per_s"] == pytest.approx(
            result["requests_per_s"])
        assert result["roofline"]["binding"] in ("compute", "memory")
        assert result["roofline"]["achieved_percent"] > 0

        strict = tmp_path / "strict.json"
        assert main(["bench", "serve", "--base-url", server.url, "--workload", str(workload),
                     "--slo-ttft-ms", "0.001", "--output", str(strict),
                     "--model-path", str(model)]) == 0
        assert json.loads(strict.read_text())["latency"]["goodput_requests_per_s"] == 0

        rate = tmp_path / "rate.json"
        assert main(["bench", "serve", "--base-url", server.url, "--workload", str(workload),
                     "--request-rate", "50", "--num-requests", "2", "--vocab-size", "384",
                     "--model", str(model), "--output", str(rate)]) == 0
        assert json.loads(rate.read_text())["num_requests"] == 2
    finally:
        server.stop()


def test_bench_throughput_and_latency_in_process(checkpoint, tmp_path, capsys):
    from kvflow.cli import main

    model = str(checkpoint("qwen2"))
    workload = tmp_path / "w.json"
    workload.write_text(json.dumps(SPEC))
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--model", model, "--workload", str(workload),
                 "--kv-cache-memory", "16MiB", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    expected = workload_from_spec(SPEC, 384)
    assert result["generated_tokens"] == sum(r.output_len for r in expected.requests)
    assert result["num_requests"] == 5 and result["roofline"]["concurrency"] == 5
    assert math.isclose(result["total_tokens_per_s"],
                        result["prompt_tokens_per_s"] + result["generated_tokens_per_s"])
    assert main(["bench", "latency", "--model", model, "--prompt-len", "8", "--output-len",
                 "4", "--num-iters", "2", "--kv-cache-memory", "16MiB"]) == 0
    text = capsys.readouterr().out
    assert "time to first token" in text and "tokens/s per stream" in text
    assert "achieved" in text
    assert main(["bench", "latency", "--model", model, "--prompt-len", "8", "--output-len",
                 "1", "--num-iters", "1", "--kv-cache-memory", "16MiB"]) == 0
    assert "no second token" in capsys.readouterr().out


@pytest.mark.parametrize("recipe,why", [("F16", "is a GGUF file"),
                                         ("Q8_0", "the weights are quantized")])
def test_bench_latency_on_a_gguf_file(gguf_file, capsys, recipe, why):
    """Its prompts are drawn from the file's own tokenizer; no roofline, since the file has
    no config.json, and its weights may keep their own formats."""
    from kvflow.cli import main

    path, _ = gguf_file("llama-gqa", recipe)
    assert main(["bench", "latency", "--model", str(path), "--prompt-len", "8",
                 "--output-len", "4", "--num-iters", "2", "--kv-cache-memory", "16MiB"]) == 0
    text = capsys.readouterr().out
    assert "tokens/s per stream" in text
    assert "no roofline: " in text and why in text


def test_bench_latency_attaches_no_roofline_to_quantized_weights(checkpoint, capsys):
    from kvflow.cli import main

    assert main(["bench", "latency", "--model", str(checkpoint("qwen2")), "--prompt-len", "8",
                 "--output-len", "4", "--num-iters", "2", "--kv-cache-memory", "16MiB",
                 "--quantization", "int8"]) == 0
    text = capsys.readouterr().out
    assert "no roofline: the weights are quantized" in text and "achieved" not in text


def test_bench_rejects_bad_arguments(tmp_path, capsys, checkpoint):
    from kvflow.cli import main

    def fails(argv: list[str], message: str) -> None:
        assert main(argv) == 2
        assert message in capsys.readouterr().err

    fails(["bench", "serve", "--workload", "mixed", "--max-concurrency", "0"], "max_concurrency")
    fails(["bench", "make-model", str(tmp_path / "none.json"), str(tmp_path / "o")],
          "neither a file nor a name")
    fails(["bench", "throughput", "--model", str(tmp_path / "no-model"), "--workload", "mixed"],
          "is not a directory")
    from server_process import free_port

    fails(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--workload",
           "mixed"], "cannot list the models")
    bad = tmp_path / "bad.json"
    for spec, message in (({**SPEC, "num_requests": 0}, "'num_requests' must be an integer"),
                          ({**SPEC, "prompt_len": {"uniform": [5, 2]}}, "'prompt_len' must be"),
                          ({"seed": 1}, "'num_requests'")):
        bad.write_text(json.dumps(spec))
        fails(["bench", "throughput", "--model", str(checkpoint("qwen2")), "--workload",
               str(bad), "--kv-cache-memory", "16MiB"], message)
    bad.write_text("{not json")
    fails(["bench", "throughput", "--model", str(checkpoint("qwen2")), "--workload", str(bad)],
          "not valid JSON")


def test_compare_reports_a_failed_system_and_runs_the_rest(checkpoint, tmp_path):
    from kvflow.bench.compare import CompareSettings, compare

    fits, too_long = tmp_path / "fits.json", tmp_path / "too-long.json"
    fits.write_text(json.dumps(SPEC))
    too_long.write_text(json.dumps({**SPEC, "name": "long",
                                    "prompt_len": {"uniform": [600, 600]}}))
    out = tmp_path / "cmp"
    results = compare(CompareSettings(model=checkpoint("qwen2"), workloads=[str(too_long),
                                                                           str(fits)],
                                      out=out, systems=["kvflow"], kv_cache_memory="16MiB"))
    assert [(r.system, r.workload) for r in results] == [("kvflow bf16", "t")]
    document = json.loads((tmp_path / "cmp.json").read_text())
    assert [f["workload"] for f in document["failures"]] == ["long"]
    assert "max_model_len" in document["failures"][0]["error"]
    assert "kvflow bf16 failed on long" in (tmp_path / "cmp.md").read_text()
    assert (tmp_path / "cmp-throughput.png").exists()
    with pytest.raises(ValueError, match="llama_cpp_parallel"):
        CompareSettings(model=tmp_path, workloads=["mixed"], out=out, llama_cpp_parallel=[0])


def test_comparison_table_and_plots(tmp_path):
    from kvflow.bench.report import attach_roofline, markdown_table, plot
    from kvflow.bench.results import RunResult

    workload = workload_from_spec(SPEC, 1000)
    config = {**QWEN_05B, "vocab_size": 1000}
    runs = [RunResult("kvflow", "t", 5, 2.0, 30, 15, latency={"ttft_samples_ms": [5.0, 7.0],
                                                             "ttft": {"p50_ms": 6.0}}),
            RunResult("llama.cpp", "t", 2, 4.0, 12, 6, settings={"tried": {"8": 1.5, "32": 1.2}})]
    for run in runs:
        attach_roofline(run, workload, config, "bfloat16", hardware.ceilings())
    assert runs[1].roofline["concurrency"] == 2  # only the prefix it ran
    table = markdown_table(runs).splitlines()
    assert len(table) == 4 and "| t | kvflow | 5 | 7.5 | 22.5 | 6 ms |" in table[2]
    assert f"{runs[0].roofline['achieved_percent']:.1f}%" in table[2]
    written = plot(runs, tmp_path / "cmp")
    assert [p.name for p in written] == ["cmp-throughput.png", "cmp-roofline.png",
                                         "cmp-concurrency.png", "cmp-latency.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def _write_gguf(path: Path, quantized: bool) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("norm", np.ones(32, np.float32))
    weight = np.linspace(-1, 1, 4 * 32, dtype=np.float32).reshape(4, 32)
    if quantized:
        writer.add_tensor("w", gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor("w", weight.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# What llama-server logs as it loads a GGUF (llama.cpp's format strings, two backends).
LLAMA_SERVER_LOG = """\
load_tensors:   CPU_Mapped model buffer size =   942.43 MiB
load_tensors:   CPU_REPACK model buffer size =   100.00 MiB
llama_context:        CPU  output buffer size =     0.58 MiB
llama_kv_cache:        CPU KV buffer size =    48.00 MiB
llama_context:        CPU compute buffer size =   298.50 MiB
"""


def test_llama_cpp_buffers_tensor_types_and_the_quantized_file_cache(tmp_path):
    from kvflow.bench import llama_cpp

    buffers = llama_cpp.buffer_sizes(LLAMA_SERVER_LOG)
    assert buffers == {"CPU_Mapped model": round(942.43 * 2**20),
                       "CPU_REPACK model": 100 * 2**20, "CPU output": round(0.58 * 2**20),
                       "CPU KV": 48 * 2**20, "CPU compute": round(298.5 * 2**20)}
    assert llama_cpp.buffer_total(buffers, "model") == round(1042.43 * 2**20)
    assert llama_cpp.buffer_total(buffers, "KV") == 48 * 2**20
    assert llama_cpp.buffer_total(llama_cpp.buffer_sizes("no buffers here"), "model") is None
    bf16 = _write_gguf(tmp_path / "m-abc-bf16.gguf", quantized=False)
    assert llama_cpp.gguf_tensor_types(bf16) == {"F16": 1, "F32": 1}
    # llama-quantize's output is cached beside the bf16 file: present, it is not run again
    # (and not built: KVFLOW_CACHE is empty here).
    q8 = _write_gguf(tmp_path / "m-abc-Q8_0.gguf", quantized=True)
    assert llama_cpp.quantize_gguf(bf16, "Q8_0") == q8
    assert llama_cpp.gguf_tensor_types(q8) == {"F32": 1, "Q8_0": 1}
    assert llama_cpp.quantize_gguf(bf16, "BF16") == bf16
    with pytest.raises(ValueError, match="unknown GGUF type 'Q5_1'"):
        llama_cpp.quantize_gguf(bf16, "Q5_1")


def test_llama_cpp_builds_without_amx_only_where_amx_traps(monkeypatch):
    from kvflow.bench import llama_cpp

    monkeypatch.setattr(llama_cpp, "cpuinfo", lambda: {"flags": "fpu avx2 avx512f"})
    llama_cpp.amx_traps.cache_clear()
    try:
        # No AMX listed: no probe, the native build.
        assert not llama_cpp.amx_traps() and llama_cpp.build_dir().name == "build"
    finally:
        llama_cpp.amx_traps.cache_clear()


def test_a_llama_cpp_test_that_crashes_in_the_native_build_runs_again_without_amx(monkeypatch,
                                                                                   tmp_path):
    from kvflow.bench import llama_cpp, peer_tests

    gguf = _write_gguf(tmp_path / "m-abc-Q8_0.gguf", quantized=True)
    monkeypatch.setattr(llama_cpp, "ensure_llama_server", lambda amx=True: None)
    monkeypatch.setattr(llama_cpp, "amx_traps", lambda: False)
    builds = []

    def native_crashes(command):
        builds.append(Path(command[0]).parent.parent.name)
        if builds[-1] == "build":
            raise llama_cpp.Crashed("llama-bench exited with -11: ")
        return LLAMA_BENCH_JSON
    monkeypatch.setattr(peer_tests, "_output", native_crashes)
    test = peer_tests.PeerTest.parse("pp24")
    monkeypatch.setattr(llama_cpp, "has_amx", lambda: True)
    result = peer_tests.run_llama_cpp(test, gguf, 2, 2, "llama.cpp Q8_0")
    assert builds == ["build", "build-no-amx"] and result.tokens_per_s > 0
    assert result.settings["build"] == "build-no-amx"
    assert result.settings["native_build_crashed"] == "llama-bench exited with -11: "
    # Without AMX there is one build: its crash is the test's failure.
    monkeypatch.setattr(llama_cpp, "has_amx", lambda: False)
    with pytest.raises(llama_cpp.Crashed):
        peer_tests.run_llama_cpp(test, gguf, 2, 2, "llama.cpp Q8_0")
    # A failure that is not a crash is not run again.
    monkeypatch.setattr(llama_cpp, "has_amx", lambda: True)
    builds.clear()

    def fails(command):
        builds.append(command)
        raise RuntimeError("llama-bench exited with 1: bad file")
    monkeypatch.setattr(peer_tests, "_output", fails)
    with pytest.raises(RuntimeError, match="bad file"):
        peer_tests.run_llama_cpp(test, gguf, 2, 2, "llama.cpp Q8_0")
    assert len(builds) == 1


def test_a_llama_server_that_crashes_in_the_native_build_serves_again_without_amx(
        monkeypatch, tmp_path):
    import contextlib
    import os

    from kvflow.bench import compare, llama_cpp
    from kvflow.bench.results import RunResult
    from kvflow.bench.workload import BenchRequest, Workload

    gguf = _write_gguf(tmp_path / "m-abc-Q8_0.gguf", quantized=True)
    monkeypatch.setattr(llama_cpp, "has_amx", lambda: True)
    monkeypatch.setattr(llama_cpp, "amx_traps", lambda: False)
    monkeypatch.setattr(llama_cpp, "peer_dir", lambda: tmp_path)
    served = []

    @contextlib.contextmanager
    def server(gguf, parallel, context, threads, log, amx=True):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(LLAMA_SERVER_LOG)
        served.append(amx)
        yield "http://127.0.0.1:1", os.getpid()
        if amx:  # as llama_server reports a server that died while it was used
            raise llama_cpp.Crashed("llama-server exited with -11: see log")
    monkeypatch.setattr(llama_cpp, "llama_server", server)
    monkeypatch.setattr(compare, "run_serve", lambda url, workload, load, model, system:
                        RunResult(system, workload.name, 2, 1.0, 8, 4))
    workload = Workload("w", {}, [BenchRequest([1, 2, 3, 4], 2)] * 2)
    settings = compare.CompareSettings(model=tmp_path, workloads=["mixed"], out=tmp_path / "o",
                                       llama_cpp_parallel=[2], threads=2)
    result = compare._llama_cpp(settings, workload, gguf, "llama.cpp Q8_0")
    assert served == [True, False]
    assert result.settings["build"] == "build-no-amx"
    assert result.settings["native_build_crashed"] == "llama-server exited with -11: see log"


def test_llama_cpp_exits_by_a_signal_are_crashes():
    from kvflow.bench import llama_cpp, peer_tests

    with pytest.raises(llama_cpp.Crashed, match="exited with -11"):
        peer_tests._output(["sh", "-c", "kill -SEGV $$"])
    with pytest.raises(RuntimeError, match="exited with 3") as failure:
        peer_tests._output(["sh", "-c", "exit 3"])
    assert not isinstance(failure.value, llama_cpp.Crashed)


def _onednn_runs_amx() -> bool:
    """Whether torch's oneDNN executes an AMX kernel for a bf16 matmul here, which it
    does only where the tile instructions run."""
    import subprocess
    import sys

    script = ("import torch; a = torch.ones(64, 256, dtype=torch.bfloat16); "
              "(a @ a.T.contiguous()).sum()")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"}, check=True)
    return any(",exec," in line and "amx" in line for line in run.stdout.splitlines())


def test_amx_probe_agrees_with_onednn_where_amx_runs():
    from kvflow.bench import llama_cpp

    if not _onednn_runs_amx():
        pytest.skip("oneDNN runs no AMX kernel on this CPU")
    llama_cpp.amx_traps.cache_clear()
    try:
        # A probe that traps here would build llama.cpp without its AMX kernels: a
        # weaker peer than the machine allows.
        assert not llama_cpp.amx_traps() and llama_cpp.build_dir().name == "build"
    finally:
        llama_cpp.amx_traps.cache_clear()


def test_process_memory_reads_proc_status():
    import subprocess
    import sys

    from kvflow.bench.memory import process_memory

    mine = process_memory()
    assert mine["rss"] >= mine["rss_anon"] + mine["rss_file"] - 2**20 > 0
    # Another process's, as compare reads llama-server's: 64 MiB touched shows as anonymous.
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(64 << 20); "
                              "print(flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdout.readline()
        assert process_memory(child.pid)["rss_anon"] > 64 << 20
    finally:
        child.communicate(b"")
    with pytest.raises(FileNotFoundError):
        process_memory(child.pid)


def test_compare_options_and_row_names(tmp_path, capsys):
    from kvflow.bench.compare import CompareSettings, system_name
    from kvflow.cli import main

    assert system_name("llama.cpp", "Q4_K_M") == "llama.cpp Q4_K_M"
    for field, value in (("kvflow_quantizations", ["int3"]), ("llama_cpp_types", ["Q5_1"]),
                         ("llama_cpp_types", [])):
        with pytest.raises(ValueError, match=field):
            CompareSettings(model=tmp_path, workloads=["mixed"], out=tmp_path, **{field: value})
    with pytest.raises(SystemExit):
        main(["bench", "compare", "--workloads", "mixed", "--out", str(tmp_path / "o"),
              "--kvflow-quantizations", "int9"])
    assert "invalid choice: 'int9'" in capsys.readouterr().err


def test_compare_runs_each_format_and_reports_its_memory(checkpoint, tmp_path, monkeypatch):
    """kvflow in two formats and "llama.cpp" in two, in one run. llama-server is stood in
    for by a kvflow server (the same OpenAI stream), so that every step compare takes on
    the llama.cpp side runs without building llama.cpp: the GGUF chain, the server's
    memory read from its process, the buffers from its log, and the rows' names."""
    import contextlib

    from kvflow.bench import llama_cpp
    from kvflow.bench.compare import CompareSettings, compare

    model = checkpoint("qwen2")
    bf16 = _write_gguf(tmp_path / "m-abc-bf16.gguf", quantized=False)
    _write_gguf(tmp_path / "m-abc-Q8_0.gguf", quantized=True)
    monkeypatch.setattr(llama_cpp, "convert_to_gguf", lambda checkpoint: bf16)

    @contextlib.contextmanager
    def stand_in(gguf, parallel, context, threads, log, amx=True):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(LLAMA_SERVER_LOG)
        server = ServerProcess(model, "--served-model-name", "gguf", "--kv-cache-memory",
                               "16MiB", log=tmp_path / f"{gguf.stem}.log")
        try:
            server.wait_ready()
            yield server.url, server.process.pid
        finally:
            server.stop()

    monkeypatch.setattr(llama_cpp, "llama_server", stand_in)
    workload = tmp_path / "w.json"
    workload.write_text(json.dumps(SPEC))
    out = tmp_path / "cmp"
    results = compare(CompareSettings(
        model=model, workloads=[str(workload)], out=out, systems=["kvflow", "llama.cpp"],
        kv_cache_memory="16MiB", llama_cpp_parallel=[2],
        kvflow_quantizations=["bf16", "int8"], llama_cpp_types=["BF16", "Q8_0"]))
    assert [r.system for r in results] == ["kvflow bf16", "kvflow int8", "llama.cpp BF16",
                                           "llama.cpp Q8_0"]
    assert all(r.num_requests == 5 for r in results)
    # The roofline counts weights at bf16's width: drawn only for the unquantized runs.
    assert [bool(r.roofline) for r in results] == [True, False, True, False]
    memory = {r.system: r.settings["memory"] for r in results}
    kv_bf16, kv_int8 = memory["kvflow bf16"], memory["kvflow int8"]
    assert kv_bf16["file_bytes"] == kv_int8["file_bytes"] > 0
    # int8 holds the decoder's matrices in a byte each (plus scales); the tied embedding
    # stays at bf16.
    assert 0 < kv_int8["weight_bytes"] < kv_bf16["weight_bytes"]
    assert kv_bf16["rss_after_load"]["rss"] > kv_bf16["rss_before_load"]["rss"] > 0
    assert memory["llama.cpp Q8_0"]["tensor_types"] == {"F32": 1, "Q8_0": 1}
    assert memory["llama.cpp Q8_0"]["file"].endswith("m-abc-Q8_0.gguf")
    assert memory["llama.cpp BF16"]["weight_bytes"] == round(1042.43 * 2**20)
    assert 0 < kv_bf16["kv_cache_bytes"] == kv_int8["kv_cache_bytes"] <= 16 << 20
    assert memory["llama.cpp BF16"]["rss_after_load"]["rss"] > 0
    table = (tmp_path / "cmp.md").read_text()
    assert "| llama.cpp Q8_0 | m-abc-Q8_0.gguf | 0 | 1,042 | 48 |" in table
    assert "| kvflow int8 | " in table and "RSS added by the load" in table


LLAMA_BENCH_JSON = json.dumps([{"cpu_info": "AMD EPYC", "n_prompt": 0, "n_gen": 128,
                                "avg_ts": 28.7, "samples_ts": [28.1, 28.7, 29.3]}])
BATCHED_BENCH_JSONL = (
    "main: n_kv_max = 20544\n"
    '{"n_kv_max": 20544, "pp": 256, "tg": 64, "pl": 16, "n_kv": 5120, "t_pp": 12.1, '
    '"speed_pp": 338.5, "t_tg": 4.7, "speed_tg": 217.9, "t": 16.8, "speed": 304.8}\n')


def test_peer_tests_are_named_and_parsed_as_llama_cpp_prints_them():
    from kvflow.bench.peer_tests import (PeerTest, PeerTestResult, parse_batched_bench,
                                         parse_llama_bench, peer_table)

    assert PeerTest.parse("pp512") == PeerTest(512, 0)
    assert PeerTest.parse("tg128") == PeerTest(0, 128)
    batched = PeerTest.parse("pp256+tg64x16")
    assert batched == PeerTest(256, 64, 16) and batched.batched
    for test in ("pp512", "tg128", "pp256+tg64x16"):
        assert PeerTest.parse(test).name == test
    for bad in ("pp0", "tg", "pp1+tg0x4", "pp8+tg8x0", "b16"):
        with pytest.raises(ValueError, match="peer test"):
            PeerTest.parse(bad)
    assert parse_llama_bench(LLAMA_BENCH_JSON) == [28.1, 28.7, 29.3]
    assert parse_batched_bench(BATCHED_BENCH_JSONL) == 304.8
    with pytest.raises(ValueError, match="one llama-bench test"):
        parse_llama_bench("[]")
    table = peer_table([PeerTestResult("kvflow bf16", "tg128", 30.5, [30.5]),
                        PeerTestResult("llama.cpp BF16", "tg128", 28.7, [28.7]),
                        PeerTestResult("llama.cpp BF16", "pp512", 350.0, [350.0]),
                        PeerTestResult("kvflow bf16", "tg128", 20.0, [20.0]),
                        PeerTestResult("kvflow bf16", "tg128", 31.5, [31.5])])
    assert "| tg128 | generated tokens/s | 30.5 | 28.7 |" in table  # the median round
    assert "| pp512 | prompt tokens/s | - | 350.0 |" in table


def _checkpoint_tensors(path: Path) -> dict[str, torch.Size]:
    from safetensors import safe_open

    shapes = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            shapes.update({name: f.get_slice(name).get_shape() for name in f.keys()})
    return shapes


@pytest.mark.parametrize("variant, read_by_a_token", [
    # Tied: the embedding is the LM head, read whole.
    ("qwen2", lambda name: True),
    # Untied: one row of the embedding is gathered, the head read whole.
    ("llama-gqa", lambda name: name != "model.embed_tokens.weight"),
])
def test_decode_bytes_count_the_weights_a_generated_token_reads(checkpoint, gguf_file,
                                                                 variant, read_by_a_token):
    from kvflow import LLM
    from kvflow.bench.peer_tests import gguf_decode_bytes, kvflow_decode_bytes

    path = checkpoint(variant)
    shapes = _checkpoint_tensors(path)
    expected = sum(2 * math.prod(shape) for name, shape in shapes.items()
                   if read_by_a_token(name))
    bf16 = LLM(str(path), dtype="bfloat16", kv_cache_memory="16MiB", enforce_eager=True)
    assert kvflow_decode_bytes(bf16) == expected
    int8 = LLM(str(path), dtype="bfloat16", kv_cache_memory="16MiB", enforce_eager=True,
               quantization="int8", quantize_lm_head=True)
    assert 0.45 * expected < kvflow_decode_bytes(int8) < 0.6 * expected
    gguf, _ = gguf_file(variant, "BF16")
    # The converter keeps vectors (norms, biases) in F32.
    vectors = sum(math.prod(shape) for name, shape in shapes.items() if len(shape) == 1)
    assert gguf_decode_bytes(gguf) == expected + 2 * vectors


def test_decode_bytes_of_a_mixture_of_experts_count_the_experts_a_token_uses(checkpoint,
                                                                             gguf_file):
    from kvflow import LLM
    from kvflow.bench.peer_tests import gguf_decode_bytes, kvflow_decode_bytes

    every_layer = dict(mlp_only_layers=[])  # what a GGUF file's metadata can say
    path = checkpoint("qwen3-moe", **every_layer)
    shapes = _checkpoint_tensors(path)
    # Untied; 2 of 8 experts a token.
    expected = sum(math.prod(shape) * (2 / 8 if ".experts." in name else 1)
                   for name, shape in shapes.items() if name != "model.embed_tokens.weight")
    engine = LLM(str(path), dtype="float32", kv_cache_memory="16MiB", enforce_eager=True)
    assert kvflow_decode_bytes(engine) == round(4 * expected)
    gguf, _ = gguf_file("qwen3-moe", "F32", **every_layer)
    assert gguf_decode_bytes(gguf) == round(4 * expected)


def test_a_prompt_token_costs_its_products_attention_and_a_share_of_one_logit_row():
    from kvflow.bench.peer_tests import prompt_flops_per_token

    # Qwen2.5-0.5B: 357,898,112 non-embedding parameters; 14 heads of 64 in 24 layers, each
    # of 512 tokens attending 256.5 on average; one row of logits over 151,936 tokens.
    expected = (2 * 357_898_112 + 4 * 14 * 64 * 24 * 513 / 2 + 2 * 896 * 151_936 / 512)
    assert prompt_flops_per_token(QWEN_05B, 512) == pytest.approx(expected)


def test_compare_runs_the_peer_tests_in_kvflow_and_in_llama_cpps_tools(checkpoint, tmp_path,
                                                                       monkeypatch):
    """kvflow's side for real, on a small model; llama.cpp's tools stood in for by their
    recorded output (building llama.cpp takes minutes)."""
    from kvflow.bench import hardware, llama_cpp, peer_tests
    from kvflow.bench.compare import CompareSettings, compare

    bf16 = _write_gguf(tmp_path / "m-abc-bf16.gguf", quantized=False)
    monkeypatch.setattr(llama_cpp, "convert_to_gguf", lambda checkpoint: bf16)
    monkeypatch.setattr(llama_cpp, "ensure_llama_server", lambda amx=True: None)
    commands = []

    def recorded(command):
        commands.append(command)
        return BATCHED_BENCH_JSONL if "llama-batched-bench" in command[0] else LLAMA_BENCH_JSON
    monkeypatch.setattr(peer_tests, "_output", recorded)
    rates, flops = [], []

    def read_rate(*args, **kwargs):
        rates.append(real_read_rate(*args, **kwargs))
        return rates[-1]
    real_read_rate = hardware.read_rate
    monkeypatch.setattr(hardware, "read_rate", read_rate)

    def matmul_flops(*args, **kwargs):
        flops.append(real_matmul_flops(*args, **kwargs))
        return flops[-1]
    real_matmul_flops = hardware.matmul_flops
    monkeypatch.setattr(hardware, "matmul_flops", matmul_flops)
    out = tmp_path / "cmp"
    compare(CompareSettings(model=checkpoint("qwen2"), workloads=[], out=out,
                            systems=["kvflow", "llama.cpp"], kv_cache_memory="16MiB",
                            peer_tests=["pp24", "tg8", "pp8+tg4x3"], peer_repetitions=2,
                            peer_rounds=2))
    document = json.loads((tmp_path / "cmp.json").read_text())
    # Two rounds, kvflow's side and llama.cpp's alternating.
    assert [(r["system"], r["settings"]["round"]) for r in document["peer_tests"]][::3] == [
        ("kvflow bf16", 0), ("llama.cpp BF16", 0), ("kvflow bf16", 1), ("llama.cpp BF16", 1)]
    rows = {(r["system"], r["test"]): r for r in document["peer_tests"]}
    assert set(rows) == {(s, t) for s in ("kvflow bf16", "llama.cpp BF16")
                         for t in ("pp24", "tg8", "pp8+tg4x3")}
    for test in ("pp24", "tg8", "pp8+tg4x3"):
        kvflow = rows[("kvflow bf16", test)]
        assert len(kvflow["samples"]) == 2 and kvflow["tokens_per_s"] > 0
    assert rows[("llama.cpp BF16", "pp8+tg4x3")]["samples"] == [304.8, 304.8]
    bench = next(c for c in commands if c[0].endswith("llama-bench") and "-p" in c)
    assert bench[bench.index("-p") + 1] == "24" and bench[bench.index("-n") + 1] == "0"
    batched = next(c for c in commands if c[0].endswith("llama-batched-bench"))
    assert [batched[batched.index(f) + 1] for f in ("-npp", "-ntg", "-npl")] == ["8", "4", "3"]
    # The read and matmul rates measured before each side's tests, one of each per side and
    # round; a decode test's result carries them with its format's bytes per token, a
    # prefill's with its FLOPs per token.
    for ceiling, measured_rates in (("read_ceiling_bytes_per_s", rates),
                                    ("matmul_ceiling_flops_per_s", flops)):
        beside: dict[tuple[str, int], set[float]] = {}
        for row in document["peer_tests"]:
            key = (row["system"], row["settings"]["round"])
            beside.setdefault(key, set()).add(row["settings"][ceiling])
        assert len(beside) == 4 and all(len(values) == 1 for values in beside.values())
        measured = {value for values in beside.values() for value in values}
        assert measured <= set(measured_rates) and min(measured) > 0
    for row in document["peer_tests"]:
        assert ("bytes_per_token" in row["settings"]) == (row["test"] == "tg8")
        assert ("flops_per_token" in row["settings"]) == (row["test"] == "pp24")
    assert {rows[(s, "pp24")]["settings"]["flops_per_token"]
            for s in ("kvflow bf16", "llama.cpp BF16")} == {
        peer_tests.prompt_flops_per_token(json.loads(
            (checkpoint("qwen2") / "config.json").read_text()), 24)}
    assert rows[("llama.cpp BF16", "tg8")]["settings"]["bytes_per_token"] == 32 * 4 + 4 * 32 * 2
    report = (tmp_path / "cmp.md").read_text()
    assert "family" in report and "| tg8 | generated tokens/s |" in report
    share = re.search(r"\| tg8 \| weights read \(% of the read ceiling beside it\) \| "
                      r"([\d.]+) GB/s \((\d+)%\) \| ([\d.]+) GB/s \((\d+)%\) \|", report)
    assert share, report
    kvflow = peer_tests.PeerTestResult(**rows[("kvflow bf16", "tg8")])
    assert kvflow.read_share == pytest.approx(
        kvflow.tokens_per_s * kvflow.settings["bytes_per_token"]
        / kvflow.settings["read_ceiling_bytes_per_s"])
    assert kvflow.compute_share is None
    assert re.search(r"\| pp24 \| computed \(% of the matmul ceiling beside it\) \| "
                     r"[\d.]+ TFLOP/s \(\d+%\) \| [\d.]+ TFLOP/s \(\d+%\) \|", report), report
    prefill = peer_tests.PeerTestResult(**rows[("kvflow bf16", "pp24")])
    assert prefill.compute_share == pytest.approx(
        prefill.tokens_per_s * prefill.settings["flops_per_token"]
        / prefill.settings["matmul_ceiling_flops_per_s"])
    with pytest.raises(ValueError, match="nothing to compare"):
        CompareSettings(model=tmp_path, workloads=[], out=out)
    with pytest.raises(ValueError, match="unknown peer test 'pp'"):
        CompareSettings(model=tmp_path, workloads=[], out=out, peer_tests=["pp"])
