"""A vLLM user's command line and script, unchanged but for the name."""
from __future__ import annotations

import signal

import httpx
import openai
import pytest
from server_process import ServerProcess


def test_a_vllm_command_line_serves(checkpoint, tmp_path):
    model = checkpoint("qwen3", max_position_embeddings=4096)
    # What a vLLM user types, with CPU-sized numbers.
    process = ServerProcess(None, "--model", str(model), "-tp", "1", "-pp", "1",
                            "--gpu-memory-utilization", "0.02", "--max-model-len", "2k",
                            "--enable-prefix-caching", "--trust-remote-code", "--enforce-eager",
                            "--disable-log-requests", "--uvicorn-log-level", "warning",
                            "--served-model-name", "tiny", "--api-key", "key-a", "key-b",
                            "--response-role", "bot", "--max-logprobs", "3",
                            "--allowed-origins", '["https://app.example"]', "--dtype",
                            "float32", "--device", "cpu", log=tmp_path / "serve.log")
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
        assert "POST /v1/chat/completions" not in log  # uvicorn at warning: no access log
    finally:
        process.stop()  # its "shutdown complete" line is info, which this log level hides
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
    (["serve", "--quantization", "awq"], "--quantization is a vLLM option kvflow does not have"),
    (["serve", "--swap-space", "4"], "recomputed, never swapped"),
    (["serve", "--ssl-keyfile=k.pem"], "TLS-terminating proxy"),
    (["serve", "--no-enable-chunked-prefill"], "always chunked"),
    (["serve", "-tp", "2"], "tensor parallelism is not built yet"),
    (["serve", "--made-up-flag"], "unrecognized argument '--made-up-flag'"),
    (["serve", "m", "--model", "n"], "two models given"),
    (["serve", "--allowed-origins", "*"], "not a JSON list"),
    (["generate", "--prompt", "x", "--chat-template", "t.jinja"], "--chat-template is not built"),
])
def test_vllm_flags_kvflow_lacks_are_refused_with_a_reason(argv, message, capsys):
    from kvflow.cli import main

    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own refusal of a bad value
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err


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
    with pytest.raises(ValueError, match="quantization is a vLLM option kvflow does not have"):
        LLM(model=str(checkpoint("llama-gqa")), quantization="awq")
