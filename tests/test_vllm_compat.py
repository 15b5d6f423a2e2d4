"""A vLLM user's command line and script, unchanged but for the name."""
from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_process import ServerProcess

DATA = Path(__file__).parent / "data"


def test_a_vllm_command_line_serves(checkpoint, tmp_path):
    model = checkpoint("qwen3", max_position_embeddings=4096)
    # What a vLLM user types, with CPU-sized numbers.
    process = ServerProcess(None, "--model", str(model), "-tp", "1", "-pp", "1",
                            "--gpu-memory-utilization", "0.02", "--max-model-len", "2k",
                            "--enable-prefix-caching", "--trust-remote-code", "--enforce-eager",
                            "--disable-log-requests", "--uvicorn-log-level", "info",
                            "--disable-uvicorn-access-log", "--disable-fastapi-docs",
                            "--served-model-name", "tiny", "--api-key", "key-a", "key-b",
                            "--response-role", "bot", "--max-logprobs", "3",
                            "--allowed-origins", '["https://app.example"]', "--dtype",
                            "float32", "--device", "cpu", "--max-num-seqs", "8",
                            "--max-num-batched-tokens", "512", "--seed", "0",
                            "--generation-config", "auto", "--download-dir", str(tmp_path),
                            "--speculative-config",
                            '{"method": "ngram", "num_speculative_tokens": 2}',
                            log=tmp_path / "serve.log")
    try:
        process.wait_ready()
        client = openai.OpenAI(base_url=process.url + "/v1", api_key="key-b", max_retries=0)
        chat = client.chat.completions.create(model="tiny", max_tokens=3, temperature=0,
                                              messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.role == "bot"
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert client.models.list().data[0].max_model_len == 2000
        with pytest.raises(openai.BadRequestError, match="max_logprobs=3"):
            client.completions.create(model="tiny", prompt="x", max_tokens=1, logprobs=4)
        wrong = openai.OpenAI(base_url=process.url + "/v1", api_key="key-c", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        preflight = httpx.options(process.url + "/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        log = process.log_path.read_text()
        assert "trust_remote_code is ignored" in log
        assert "POST /v1/chat/completions" not in log  # uvicorn at info, access log off
        key = {"Authorization": "Bearer key-a"}
        assert httpx.get(process.url + "/docs", headers=key).status_code == 404
        assert httpx.get(process.url + "/openapi.json", headers=key).status_code == 404
    finally:
        process.stop()
    assert process.process.returncode in (0, -signal.SIGTERM)


def test_request_logging_names_sizes_not_text(checkpoint, tmp_path):
    process = ServerProcess(checkpoint("qwen3"), "--enable-log-requests", "--dtype", "float32",
                            "--device", "cpu", "--kv-cache-memory", "16MiB",
                            log=tmp_path / "serve.log")
    try:
        process.wait_ready()
        body = {"prompt": "secret words", "max_tokens": 2, "n": 2, "seed": 3}
        assert httpx.post(process.url + "/v1/completions", json=body).status_code == 200
        log = process.log_path.read_text()
        assert "n=2, max_tokens=2" in log and "seed=3" in log
        assert "secret words" not in log
    finally:
        assert process.stop()


@pytest.mark.parametrize("argv, message", [
    (["serve", "--quantization", "fp8"], "quantization='fp8' is not supported"),
    (["serve", "--swap-space", "4"], "recomputed, never swapped"),
    (["serve", "--ssl-keyfile=k.pem"], "TLS-terminating proxy"),
    (["serve", "--no-enable-chunked-prefill"], "always chunked"),
    (["serve", "-dp", "2", "-n", "2"], "engine cores run on this machine only"),
    (["serve", "-dp", "2", "--data-parallel-routing", "random"],
     "invalid choice: 'random'"),
    (["serve", "-tp", "2", "-n", "2"], "needs --master-addr and --master-port"),
    (["serve", "--made-up-flag"], "unrecognized argument '--made-up-flag'"),
    (["serve", "m", "--model", "n"], "two models given"),
    (["serve", "--allowed-origins", "*"], "not a JSON list"),
    (["serve", "--chat-template", "missing.jinja"], "no file 'missing.jinja'"),
    (["serve", "--chat-template", "{% if %}"], "--chat-template does not parse"),
    (["serve", "--override-generation-config", '{"temp": 1}'], "temp not supported"),
    (["serve", "--override-generation-config", "temperature=0"], "not valid JSON"),
    (["serve", "--enable-auto-tool-choice"], "needs --tool-call-parser (one of hermes)"),
    (["serve", "--tool-call-parser", "mistral"], "invalid choice: 'mistral'"),
    (["serve", "--reasoning-parser", "granite"], "invalid choice: 'granite'"),
])
def test_vllm_flags_kvflow_lacks_are_refused_with_a_reason(argv, message, capsys):
    from kvflow.cli import main

    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own refusal of a bad value
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_every_vllm_serve_flag_is_accepted_or_refused_by_name(capsys):
    """vLLM 0.11 and 0.12's whole `vllm serve` command line (tests/data): each flag, and
    each short alias, is one kvflow takes or one it refuses with what to do instead."""
    from kvflow.cli import main
    from kvflow.vllm_compat import refusal

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    accepted = set(re.findall(r"(?<![\w-])-{1,2}[A-Za-z][\w-]*", capsys.readouterr().out))
    lines = (DATA / "vllm_serve_flags.txt").read_text().splitlines()
    spellings = [s for line in lines if not line.startswith("#") for s in line.split()]
    assert len(spellings) > 200
    for spelling in spellings:
        if spelling in accepted:
            continue
        assert refusal(spelling) is not None, spelling
        assert main(["serve", spelling, "1"]) == 2
        err = capsys.readouterr().err
        assert "is a vLLM option kvflow does not have: " in err, (spelling, err)


def test_a_vllm_offline_script_runs(checkpoint):
    from kvflow import LLM, SamplingParams

    llm = LLM(model=str(checkpoint("llama-gqa")), gpu_memory_utilization=0.01, dtype="float32",
              trust_remote_code=True, enforce_eager=True, quantization=None, enable_lora=False,
              tensor_parallel_size=1, max_model_len=256, seed=0, device="cpu")
    sampling = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, seed=1)
    outputs = llm.generate(["Hello, my name is", "The capital of France is"], sampling)
    for output in outputs:
        assert output.outputs[0].text and output.outputs[0].finished()
        assert output.finished and output.num_cached_tokens == 0
    assert llm.llm_engine is llm.engine
    with pytest.raises(ValueError, match="quantization='awq' is for AWQ checkpoints, but"):
        LLM(model=str(checkpoint("llama-gqa")), quantization="awq")


# Every series vLLM's dashboard reads, with its type (prometheus_client's family types).
VLLM_SERIES = {
    "num_requests_running": "gauge", "num_requests_waiting": "gauge",
    "kv_cache_usage_perc": "gauge", "cache_config_info": "gauge",
    "prompt_tokens": "counter", "generation_tokens": "counter", "num_preemptions": "counter",
    "prefix_cache_queries": "counter", "prefix_cache_hits": "counter",
    "request_success": "counter",
    "request_prompt_tokens": "histogram", "request_generation_tokens": "histogram",
    "request_params_n": "histogram", "request_params_max_tokens": "histogram",
    "request_max_num_generation_tokens": "histogram", "iteration_tokens_total": "histogram",
    "time_to_first_token_seconds": "histogram", "inter_token_latency_seconds": "histogram",
    "request_time_per_output_token_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram", "request_queue_time_seconds": "histogram",
    "request_inference_time_seconds": "histogram", "request_prefill_time_seconds": "histogram",
    "request_decode_time_seconds": "histogram",
    "spec_decode_num_drafts": "counter", "spec_decode_num_draft_tokens": "counter",
    "spec_decode_num_accepted_tokens": "counter",
    "spec_decode_num_accepted_tokens_per_pos": "counter",
}


def test_metrics_are_vllms_series_under_either_prefix(checkpoint, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    model = checkpoint("qwen3", max_position_embeddings=65536)
    process = ServerProcess(model, "--metrics-prefix", "vllm", "--served-model-name", "tiny",
                            "--dtype", "float32", "--device", "cpu", "--kv-cache-memory",
                            "80MiB", "--speculative-config",
                            '{"method": "ngram", "num_speculative_tokens": 3}',
                            log=tmp_path / "serve.log")

    def families() -> dict:
        text = httpx.get(process.url + "/metrics").text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def value(family, suffix: str = "", **labels: str) -> float:
        return next(s.value for s in family.samples if s.name == family.name + suffix
                    and all(s.labels.get(k) == v for k, v in labels.items()))

    try:
        process.wait_ready()
        prompt = list(range(40, 140))
        endless = {"model": "tiny", "prompt": prompt, "max_tokens": 60000, "ignore_eos": True,
                   "stream": True}
        with httpx.stream("POST", process.url + "/v1/completions", json=endless,
                          timeout=60) as stream:
            lines = stream.iter_lines()
            next(lines)
            running = families()
            # Prompt tokens are counted as they are computed, not when the request ends.
            assert value(running["vllm:prompt_tokens"], "_total") == len(prompt)
            assert value(running["vllm:num_requests_running"]) == 1
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 5, "n": 2, "ignore_eos": True}
        assert httpx.post(process.url + "/v1/completions", json=body).status_code == 200
        # Output that repeats itself (forced by the bias) gives the ngram proposer drafts.
        looped = {"model": "tiny", "prompt": [5, 6, 7, 8] * 8, "max_tokens": 8,
                  "temperature": 0, "ignore_eos": True, "logit_bias": {"5": 100}}
        assert httpx.post(process.url + "/v1/completions", json=looped).status_code == 200
        found = families()
        drafts = value(found["vllm:spec_decode_num_drafts"], "_total")
        draft_tokens = value(found["vllm:spec_decode_num_draft_tokens"], "_total")
        accepted = value(found["vllm:spec_decode_num_accepted_tokens"], "_total")
        assert 1 <= drafts and drafts <= draft_tokens <= 3 * drafts
        assert 1 <= accepted <= draft_tokens
        per_position = [value(found["vllm:spec_decode_num_accepted_tokens_per_pos"], "_total",
                              position=str(p)) for p in range(3)]
        assert sum(per_position) == accepted and per_position == sorted(per_position)[::-1]
        assert value(found["vllm:request_generation_tokens"], "_sum") == 18
        for name, kind in VLLM_SERIES.items():
            family = found.get(f"vllm:{name}")
            assert family is not None and family.type == kind, (name, family)
        assert not any(name.startswith("kvflow:") for name in found)
        n = found["vllm:request_params_n"]
        assert value(n, "_count") == 2 and value(n, "_sum") == 3  # n=2, then n=1
        assert value(found["vllm:request_success"], "_total", finished_reason="length") == 3
        # vLLM's bucket sets: per-token latencies and whole-request latencies apart.
        def bounds(family) -> list[str]:
            return [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]

        assert bounds(found["vllm:inter_token_latency_seconds"])[:3] == ["0.01", "0.025", "0.05"]
        assert bounds(found["vllm:e2e_request_latency_seconds"])[:3] == ["0.3", "0.5", "0.8"]
        assert bounds(found["vllm:request_prompt_tokens"])[:4] == ["1.0", "2.0", "5.0", "10.0"]
        info = next(s for s in found["vllm:cache_config_info"].samples)
        assert info.value == 1 and info.labels["block_size"] == "16"
        assert info.labels["enable_prefix_caching"] == "True"
        deadline = time.monotonic() + 10  # the endless stream's abort lands within a step
        while value(families()["vllm:num_requests_running"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert value(families()["vllm:kv_cache_usage_perc"]) == 0
    finally:
        assert process.stop()


def test_ping_load_and_keepalive_while_queued(checkpoint, tmp_path):
    model = checkpoint("qwen3", max_position_embeddings=65536)
    process = ServerProcess(model, "--max-num-seqs", "1", "--stream-keepalive", "0.3",
                            "--api-key", "k", "--open-monitoring", "--dtype", "float32",
                            "--device", "cpu", "--kv-cache-memory", "80MiB",
                            log=tmp_path / "serve.log")
    headers = {"Authorization": "Bearer k"}
    endless = {"prompt": "x", "max_tokens": 60000, "ignore_eos": True, "stream": True}
    try:
        process.wait_ready()
        assert httpx.get(process.url + "/ping").status_code == 200
        assert httpx.post(process.url + "/ping").status_code == 200
        assert httpx.get(process.url + "/load").json()["server_load"] == 0
        with httpx.stream("POST", process.url + "/v1/completions", json=endless,
                          headers=headers, timeout=60) as running:
            first = running.iter_lines()
            next(first)
            assert running.headers["cache-control"] == "no-cache"
            with httpx.stream("POST", process.url + "/v1/completions", json=endless,
                              headers=headers, timeout=60) as queued:
                lines = queued.iter_lines()
                # Queued behind the first (max_num_seqs 1): comments keep it open.
                assert [next(lines) for _ in range(4)] == [": keep-alive", "",
                                                           ": keep-alive", ""]
                assert httpx.get(process.url + "/load").json()["server_load"] == 2
        deadline = time.monotonic() + 10
        while httpx.get(process.url + "/load").json()["server_load"] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(process.url + "/load").json()["server_load"] == 0
    finally:
        assert process.stop()
