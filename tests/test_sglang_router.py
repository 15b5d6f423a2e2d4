"""kvflow as a worker of SGLang's model gateway (sglang-router from PyPI, installed by
`make router` in a venv of its own), with its cache-aware policy."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from server_process import ServerProcess, free_port

ROUTER = Path(__file__).resolve().parents[1] / ".venv" / "sglang-router"
pytestmark = pytest.mark.skipif(not (ROUTER / ".installed").exists(),
                                reason="sglang-router is not installed here (`make router`)")

SHARED = ("You are a careful assistant. Answer in one short sentence, and never repeat the "
          "question. " * 8)


def _counter(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(value) for value in re.findall(rf"^kvflow:{name}(?:{{[^}}]*}})? (\S+)$",
                                                    text, re.MULTILINE))


def test_kvflow_serves_behind_sglang_router_with_its_cache_aware_policy(tmp_path):
    workers = [ServerProcess(None, log=tmp_path / f"worker{i}.log") for i in range(2)]
    router = None
    try:
        for worker in workers:
            worker.wait_ready()
        port = free_port()
        log = (tmp_path / "router.log").open("w")
        router = subprocess.Popen(
            [str(ROUTER / "bin" / "python"), "-m", "sglang_router.launch_router", "--host",
             "127.0.0.1", "--port", str(port), "--policy", "cache_aware",
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
             "--worker-urls", *(w.url for w in workers)], stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # until the router has registered both workers
            try:
                listed = httpx.get(base + "/v1/models", timeout=5).json()
                if [m["id"] for m in listed["data"]] == ["kvflow-demo"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "router.log").read_text()[-3000:]
            time.sleep(0.5)
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        for i in range(4):  # one long shared prefix: the policy keeps it on one worker
            reply = client.completions.create(model="kvflow-demo", prompt=f"{SHARED}Q{i}:",
                                              max_tokens=4, temperature=0)
            assert reply.choices[0].finish_reason == "length"
        chunks = list(client.chat.completions.create(
            model="kvflow-demo", messages=[{"role": "user", "content": "Hello"}],
            max_tokens=4, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        served = [_counter(w, "request_success_total") for w in workers]
        hits = [_counter(w, "prefix_cache_hits_total") for w in workers]
        shared_on = max(range(2), key=lambda i: served[i])
        assert served[shared_on] >= 4, served
        assert hits[shared_on] > 0, hits
    finally:
        if router is not None:
            router.terminate()
            router.wait(timeout=30)
        for worker in workers:
            worker.stop()
