"""Data parallelism: `kvflow serve --data-parallel-size 2`, two engine cores in processes of
their own behind one API server and its prefix router (kvflow/engine/dp_client.py)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from kvflow import LLM, SamplingParams
from kvflow.engine.dp_client import core_gpus
from kvflow.engine.router import CacheView, Router, RoutingConfig
from server_process import ServerProcess, broken_checkpoint, running

ENGINE_FLAGS = ("--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB")
LONG = "You are a careful assistant who answers in one sentence and never repeats itself. " * 3


# --- the router, alone ---------------------------------------------------------------------

def _router(**config) -> Router:
    return Router(RoutingConfig(**config), num_cores=2, block_size=4, capacity_blocks=1000)


def test_a_shared_prefix_goes_where_it_was_computed():
    router = _router()
    shared = list(range(100, 140))
    first = router.route(shared + [1, 2], None, loads=[0, 0], live=[True, True])
    assert first.decision == "no-prefix"
    for tail in range(5):
        route = router.route(shared + [7, tail], None, loads=[0, 0], live=[True, True])
        assert (route.core, route.decision) == (first.core, "prefix")
        assert route.matched_tokens == 40
    # A salt is another tenant's cache: its prefix is its own.
    assert router.route(shared + [7, 9], "tenant", loads=[0, 0],
                        live=[True, True]).decision == "no-prefix"
    assert router.decisions[first.core]["prefix"] == 5


def test_a_hot_prefix_spreads_once_its_core_is_overloaded():
    router = _router(balance_threshold=2)
    shared = list(range(200, 240))
    home = router.route(shared + [0], None, loads=[0, 0], live=[True, True]).core
    loads = [0, 0]
    loads[home] = 3  # more than 2 beyond the other core
    spread = router.route(shared + [1], None, loads=loads, live=[True, True])
    assert (spread.core, spread.decision) == (1 - home, "balance")
    # The other core now holds the prefix too, and gets it back when the first is busy.
    loads = [0, 0]
    loads[home] = 1
    assert router.route(shared + [2], None, loads=loads, live=[True, True]).core == 1 - home


def test_a_prefix_many_prompts_share_binds_none_but_their_own_histories_do():
    router = _router()
    system = list(range(300, 340))  # 10 blocks every conversation starts with
    homes = {}
    for conversation in range(8):
        first = system + [conversation] * 8 + [0]
        homes[conversation] = router.route(first, None, loads=[0, 0], live=[True, True])
    # Past the first few, a new conversation is not drawn to the system prompt's core.
    assert {homes[c].core for c in range(4, 8)} == {0, 1}
    assert all(homes[c].decision == "no-prefix" for c in range(5, 8))
    for conversation in range(8):  # a later turn follows its own history
        turn = system + [conversation] * 8 + [1000 + conversation] * 8 + [0]
        route = router.route(turn, None, loads=[0, 0], live=[True, True])
        assert (route.core, route.decision) == (homes[conversation].core, "prefix")


def test_unrelated_prompts_balance_and_a_stopped_core_is_skipped():
    router = _router()
    cores = [router.route([i] * 20, None, loads=[0, 0], live=[True, True]).core
             for i in range(10)]
    assert cores.count(0) == cores.count(1) == 5  # equal loads take turns
    assert router.route([99] * 20, None, loads=[0, 5], live=[True, True]).core == 0
    assert {router.route([i] * 20, None, loads=[0, 0], live=[False, True]).core
            for i in range(4)} == {1}
    with pytest.raises(ValueError, match="no engine core"):
        router.route([1] * 20, None, loads=[0, 0], live=[False, False])


def test_the_cache_view_forgets_tails_first():
    view = CacheView(capacity=3)
    view.insert([b"a", b"b", b"c"])
    view.insert([b"x", b"y"])  # a newer prompt: the older one loses its tail, keeps its head
    assert view.matched([b"a", b"b", b"c"]) == 1 and view.matched([b"x", b"y"]) == 2
    view = CacheView(capacity=4)
    view.insert([b"a", b"b", b"c"])
    view.insert([b"a", b"d"])  # shares the head, which is touched again
    view.insert([b"e"])
    assert view.matched([b"a", b"b", b"c"]) == 2 and view.matched([b"a", b"d"]) == 2
    assert len(view) == 4


def test_each_core_sees_a_gpu_of_its_own():
    assert core_gpus(2, "cpu", None, 0) == [None, None]
    assert core_gpus(2, "cuda", None, 4) == ["0", "1"]
    assert core_gpus(2, "cuda", "3, 5,7", 8) == ["3", "5"]
    with pytest.raises(ValueError, match="a GPU per engine core; this process sees 1"):
        core_gpus(2, "cuda", "2", 8)


@pytest.mark.parametrize("config, match", [
    ({"policy": "random"}, "routing must be one of"),
    ({"cache_threshold": 1.5}, "cache threshold"),
    ({"balance_threshold": -1}, "balance threshold"),
])
def test_bad_routing_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        RoutingConfig(**config)


# --- a served model on two cores --------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("qwen3", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # Batch-invariant, as the offline engine below, whose outputs they are compared with.
    with running(model_dir, *ENGINE_FLAGS, "--batch-invariant", "--data-parallel-size", "2",
                 "--served-model-name", "tiny",
                 log=tmp_path_factory.mktemp("dp") / "serve.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory="16MiB",
               batch_invariant=True)


def _metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The sum of a series' samples whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        found = re.match(rf"{name}{{([^}}]*)}} (\S+)$", line)
        if found and all(f'{k}="{v}"' in found.group(1) for k, v in labels.items()):
            total += float(found.group(2))
    return total


def test_greedy_tokens_match_one_engine_streamed_and_with_n(server, offline):
    prompts = [f"def f{i}(x):" for i in range(8)] + [LONG + f"Q{i}:" for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x",
                                      max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(run_all()) == expected
    both = httpx.get(server.url + "/load", timeout=10).json()["engines"]
    assert [e["engine"] for e in both] == [0, 1]
    assert all(sum(e["routed"].values()) > 0 for e in both), both  # each core served some
    reply = openai.OpenAI(base_url=server.url + "/v1", api_key="x").completions.create(
        model="tiny", prompt="import os", max_tokens=8, temperature=0, n=2,
        extra_body={"ignore_eos": True})
    greedy = offline.generate("import os", SamplingParams(temperature=0, max_tokens=8,
                                                          ignore_eos=True), use_tqdm=False)
    assert [c.text for c in reply.choices] == [greedy[0].outputs[0].text] * 2


def test_structured_output_crosses_to_the_cores(client):
    reply = client.completions.create(
        model="tiny", prompt="colour:", max_tokens=20, temperature=0,
        extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert reply.choices[0].text in ("red", "green")
    bad = httpx.post(client.base_url.join("completions").__str__(), json={
        "model": "tiny", "prompt": "x", "guided_regex": "(a"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex"


def test_a_shared_prefix_stays_on_one_core_and_hits_its_cache(server, client):
    before = [_metric(server, "kvflow:prefix_cache_hits_total", engine=str(i)) for i in (0, 1)]
    routed = [_metric(server, "kvflow:router_decisions_total", engine=str(i),
                      decision="prefix") for i in (0, 1)]
    prefix = LONG * 2 + "Unique marker 7731. "
    for i in range(4):
        client.completions.create(model="tiny", prompt=prefix + f"Item {i}:", max_tokens=2)
    hits = [_metric(server, "kvflow:prefix_cache_hits_total", engine=str(i)) - before[i]
            for i in (0, 1)]
    now = [_metric(server, "kvflow:router_decisions_total", engine=str(i),
                   decision="prefix") - routed[i] for i in (0, 1)]
    home = max((0, 1), key=lambda i: now[i])
    assert now[home] >= 3 and now[1 - home] == 0, now
    assert hits[home] >= 3 * len(LONG) // 8 and hits[1 - home] == 0, hits


def test_disconnect_aborts_on_its_core_and_frees_blocks(server, client):
    body = {"model": "tiny", "prompt": "while True:", "max_tokens": 3000, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      timeout=30) as response:
        lines = response.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(6))
    client.completions.create(model="tiny", prompt="x = 1", max_tokens=3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (_metric(server, "kvflow:num_requests_running")
                                           or _metric(server, "kvflow:kv_cache_usage_perc")):
        time.sleep(0.1)
    assert _metric(server, "kvflow:num_requests_running") == 0
    assert _metric(server, "kvflow:kv_cache_usage_perc") == 0.0
    info = httpx.get(server.url + "/get_server_info", timeout=10).json()
    assert info["dp_size"] == 2 and info["num_running"] == 0


# --- a core that dies ------------------------------------------------------------------

def _core_pids(server: ServerProcess) -> list[int]:
    """The cores' pids, in core order, from the server's log."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.search(r"2 engine cores \(pids (\d+), (\d+)\)", server.log_path.read_text())
        if found:
            return [int(found.group(1)), int(found.group(2))]
        time.sleep(0.1)
    raise AssertionError(server.log_path.read_text()[-3000:])


def _stream_lines(server: ServerProcess, prompt: str):
    body = {"model": "kvflow-demo", "prompt": prompt, "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    return httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60)


def _stream_error(lines: list[str]) -> str:
    errors = [json.loads(line[6:])["error"]["message"] for line in lines
              if line.startswith("data: {") and '"error"' in line]
    assert errors, lines[-3:]
    return errors[0]


def _serves_on(server: ServerProcess, alive: list[bool]) -> None:
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert [e["alive"] for e in health.json()["engines"]] == alive
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    for i in range(3):
        reply = client.completions.create(model="kvflow-demo", prompt=f"{i} + {i} =",
                                          max_tokens=3)
        assert reply.choices[0].finish_reason == "length"
    engines = httpx.get(server.url + "/load", timeout=10).json()["engines"]
    assert [e["alive"] for e in engines] == alive


def test_a_killed_core_leaves_the_other_serving_and_health_degraded(tmp_path):
    server = ServerProcess(None, "--data-parallel-size", "2", log=tmp_path / "serve.log")
    try:
        server.wait_ready()
        pids = _core_pids(server)
        with _stream_lines(server, "Once upon a time") as stream:
            lines = stream.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(4))
            engines = httpx.get(server.url + "/load", timeout=10).json()["engines"]
            busy = [e["num_requests"] for e in engines].index(1)
            os.kill(pids[busy], signal.SIGKILL)
            assert "engine core" in _stream_error(list(lines))
        _serves_on(server, [i != busy for i in (0, 1)])
    finally:
        assert server.stop(), server.log_path.read_text()[-3000:]


def test_a_hung_core_is_killed_and_its_unanswered_request_served_by_the_other(tmp_path):
    server = ServerProcess(None, "--data-parallel-size", "2", "--distributed-timeout", "3",
                           log=tmp_path / "serve.log")
    stopped = None
    try:
        server.wait_ready()
        pids = _core_pids(server)
        prefix = LONG * 2
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        client.completions.create(model="kvflow-demo", prompt=prefix + "A", max_tokens=2)
        engines = httpx.get(server.url + "/load", timeout=10).json()["engines"]
        home = max((0, 1), key=lambda i: sum(engines[i]["routed"].values()))
        with _stream_lines(server, prefix + "B") as stream:  # to the prefix's core
            lines = stream.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(4))
            # The core stops answering: a request sent to it meanwhile has no output
            # when the server, hearing nothing for 3 s, kills it.
            os.kill(pids[home], signal.SIGSTOP)
            stopped = pids[home]
            waiting: dict[str, httpx.Response] = {}
            sender = threading.Thread(target=lambda: waiting.update(reply=httpx.post(
                server.url + "/v1/completions", json={"model": "kvflow-demo",
                                                      "prompt": prefix + "C", "max_tokens": 3},
                timeout=60)))
            sender.start()
            assert "hung" in _stream_error(list(lines))
        sender.join(60)
        assert waiting["reply"].status_code == 200, waiting["reply"].text  # the other core's
        _serves_on(server, [i != home for i in (0, 1)])
        assert "goes to another core" in server.log_path.read_text()
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert server.stop(), server.log_path.read_text()[-3000:]


def test_each_core_may_be_several_tensor_parallel_ranks(tmp_path):
    prompts = ["The capital of France is", "def add(a, b):", "1, 2, 3,", "Hello"]
    offline = LLM(dtype="float32", device="cpu")
    expected = [o.outputs[0].text for o in offline.generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)]
    server = ServerProcess(None, "--dtype", "float32", "-dp", "2", "-tp", "2",
                           log=tmp_path / "serve.log")
    try:
        server.wait_ready()
        info = httpx.get(server.url + "/get_server_info", timeout=10).json()
        assert (info["dp_size"], info["tp_size"]) == (2, 2)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for prompt, text in zip(prompts, expected):
            reply = client.completions.create(model="kvflow-demo", prompt=prompt, max_tokens=8,
                                              temperature=0, extra_body={"ignore_eos": True})
            assert reply.choices[0].text == text
        engines = httpx.get(server.url + "/load", timeout=10).json()["engines"]
        assert all(sum(e["routed"].values()) == 2 for e in engines), engines
    finally:
        assert server.stop(), server.log_path.read_text()[-3000:]


def test_a_core_that_cannot_load_is_a_failed_load_naming_it(tmp_path):
    process = ServerProcess(broken_checkpoint(tmp_path / "broken"), "-dp", "2",
                            log=tmp_path / "serve.log")
    try:
        response = process.wait_load_failure()
        assert response.status_code == 503
        message = response.json()["error"]["message"]
        assert "engine core 0 failed to load" in message and "FancyForCausalLM" in message
    finally:
        assert process.stop()
