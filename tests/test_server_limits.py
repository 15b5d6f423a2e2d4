"""Hardening, round 2: what once crashed or disabled a real `kvflow serve` (in bf16, the
CPU's default dtype), and the limits that now stop it, each with the 400 that names it."""
from __future__ import annotations

import httpx
import pytest

from server_process import ServerProcess

FLAGS = ("--dtype", "bfloat16", "--device", "cpu", "--kv-cache-memory", "16MiB",
         "--served-model-name", "tiny", "--max-num-seqs", "8")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    model = checkpoint("qwen3", max_position_embeddings=4096)
    process = ServerProcess(model, *FLAGS, log=tmp_path_factory.mktemp("limits") / "serve.log")
    process.wait_ready()
    yield process
    assert process.stop(), process.log_path.read_text()[-3000:]


def _error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def _healthy(server) -> None:
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("extra", [{"min_tokens": 4}, {"bad_words": ["print"]},
                                   {"min_tokens": 2, "logit_bias": {"7": 3.0}}])
def test_greedy_requests_that_ban_tokens_work_in_bf16(server, extra):
    """The greedy fast path keeps bf16 logits; min_tokens and bad_words once wrote a
    float32 -inf into them: every such request was a 500, and three in a row stopped the
    engine for good."""
    for _ in range(4):
        response = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "prompt": "hello world", "max_tokens": 8, "temperature": 0, **extra})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= extra.get("min_tokens", 1)
    _healthy(server)
