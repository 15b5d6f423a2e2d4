"""The OpenAI-compatible server, run as a real process and driven by the openai client."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import openai
import pytest

from kvflow import LLM, SamplingParams
from server_process import ServerProcess, broken_checkpoint

API_KEY = "test-key"
ENGINE_FLAGS = ("--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB")
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("qwen3", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # Batch-invariant, as the offline engine below: the server's outputs are compared with
    # it exactly, though the two batch their requests differently.
    process = ServerProcess(model_dir, *ENGINE_FLAGS, "--batch-invariant", "--api-key", API_KEY,
                            "--served-model-name", "tiny", "other-name",
                            "--enable-prompt-tokens-details",
                            log=tmp_path_factory.mktemp("server") / "serve.log")
    process.wait_ready()
    yield process
    assert process.stop(), process.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory="16MiB",
               batch_invariant=True)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics", headers=HEADERS).text
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_completions_match_offline_greedy(client, offline):
    prompts = ["def fibonacci(n):", "class Stack:"]
    response = client.completions.create(model="tiny", prompt=prompts, max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True})
    expected = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12,
                                                        ignore_eos=True), use_tqdm=False)
    assert [c.text for c in response.choices] == [o.outputs[0].text for o in expected]
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in response.choices)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == 24
    token_ids = offline.get_tokenizer().encode("def fibonacci(n):")
    by_ids = client.completions.create(model="tiny", prompt=token_ids, max_tokens=12,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == expected[0].outputs[0].text


def test_chat_matches_offline_and_streams_the_same(client, offline):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    expected = offline.chat([{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hello"}],
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    response = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                              max_completion_tokens=10,
                                              extra_body={"ignore_eos": True})
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                            max_tokens=10, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_streamed_completion_n2_logprobs_and_stop(client, offline):
    tokenizer = offline.get_tokenizer()
    free = offline.generate("import os", SamplingParams(temperature=0, max_tokens=16,
                                                        ignore_eos=True), use_tqdm=False)[0]
    stop = free.outputs[0].text[4:7]
    stream = client.completions.create(model="tiny", prompt="import os", max_tokens=16,
                                       temperature=0, n=2, stop=[stop], stream=True, logprobs=2,
                                       extra_body={"ignore_eos": True})
    texts, reasons, logprobs = {0: "", 1: ""}, {}, {0: [], 1: []}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs:
                logprobs[choice.index] += choice.logprobs.token_logprobs
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    cut = free.outputs[0].text[:free.outputs[0].text.index(stop)]
    assert texts == {0: cut, 1: cut}
    assert reasons == {0: "stop", 1: "stop"}
    assert all(len(lp) >= len(tokenizer.encode(cut)) and all(v <= 0 for v in lp)
               for lp in logprobs.values())
    full = client.completions.create(model="tiny", prompt="import os", max_tokens=4,
                                     temperature=0, logprobs=3, echo=True,
                                     extra_body={"ignore_eos": True})
    choice = full.choices[0]
    assert choice.text.startswith("import os")
    prompt_len = len(tokenizer.encode("import os"))
    assert len(choice.logprobs.tokens) == prompt_len + 4
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                   "content": "hi"}],
                                          max_tokens=3, logprobs=True, top_logprobs=2,
                                          temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].logprob == content[0].top_logprobs[0].logprob  # greedy: the top token
    streamed = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12, logprobs=True,
        temperature=0, stream=True, extra_body={"ignore_eos": True})
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    assert len(entries) == 12  # one per token: none repeated, none lost


@pytest.mark.parametrize("read_delay", [0.0, 0.03])
def test_streamed_echo_and_offsets(server, read_delay):
    # Sampled, so that byte tokens (half a character each) come up; a slow reader gets
    # several tokens per chunk.
    body = {"model": "tiny", "prompt": "Hello", "echo": True, "stream": True, "max_tokens": 48,
            "stop": ["zzzzzzzzzz"], "logprobs": 1, "ignore_eos": True, "seed": 5}
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers=HEADERS) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                time.sleep(read_delay)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text.startswith("Hello") and len(text) > len("Hello")
    offsets = [o for e in events if e["choices"] and e["choices"][0]["logprobs"]
               for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert len(offsets) == 48 and offsets[0] == len("Hello")
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)


def test_echo_with_max_tokens_zero_returns_the_scored_prompt(server, client):
    """lm-evaluation-harness scores a text this way: echo it, generate nothing."""
    prompt = "def add(a, b):\n    return a + b"
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                         logprobs=1)
    choice = response.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 0
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": prompt},
                        headers=HEADERS).json()["tokens"]
    assert len(choice.logprobs.tokens) == len(tokens) == response.usage.prompt_tokens
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == prompt
    refused = httpx.post(server.url + "/v1/completions", headers=HEADERS,
                         json={"model": "tiny", "prompt": prompt, "max_tokens": 0})
    assert refused.status_code == 400 and "echo" in refused.json()["error"]["message"]
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": 3})
    assert cut.usage.prompt_tokens == 3
    assert prompt.endswith(cut.choices[0].text) and len(cut.choices[0].text) < len(prompt)


def test_32_concurrent_streams(server, offline):
    prompts = [f"def f{i}(x):" for i in range(32)]
    expected = [o.outputs[0].text for o in offline.generate(
        prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                      max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(run_all()) == expected


def test_disconnect_aborts_and_frees_blocks(server, client):
    before = metric(server, "kvflow:generation_tokens_total")
    body = {"model": "tiny", "prompt": "while True:", "max_tokens": 4000, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=HEADERS,
                      timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in received)
    # Others run beside it and finish.
    for _ in range(2):
        client.completions.create(model="tiny", prompt="x = 1", max_tokens=5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (metric(server, "kvflow:kv_cache_usage_perc") > 0
                                           or metric(server, "kvflow:num_requests_running")):
        time.sleep(0.1)
    assert metric(server, "kvflow:kv_cache_usage_perc") == 0.0
    settled = metric(server, "kvflow:generation_tokens_total")
    time.sleep(1.0)
    assert metric(server, "kvflow:generation_tokens_total") == settled  # nothing still running
    assert settled - before < 4000 + 10  # the 4000-token request was cut short


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": "tiny"}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard",
                                                             "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "logit_bias": {"abc": 1}}, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    # Constraints that cannot be compiled or enforced, named by the field that sent them.
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "n", "schema": {"type": "strin"}}}},
     "response_format"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "n"}}},
     "response_format"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "structural_tag"}}, "response_format"),
    ("/v1/completions", {"model": "tiny", "prompt": "x",
                         "guided_json": {"type": "array", "uniqueItems": True}}, "guided_json"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_regex": "(a"}, "guided_regex"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_grammar": "root ::= ("},
     "guided_grammar"),
    ("/v1/completions", {"model": "tiny", "prompt": "x",
                         "structured_outputs": {"json": {"not": {}}}}, "structured_outputs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x",
                         "structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
     "structured_outputs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_regex": "a",
                         "response_format": {"type": "json_object"}}, "guided_regex"),
    # tool_choice "auto" (the default with tools) needs --enable-auto-tool-choice.
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tool_choice"),
])
def test_bad_requests_get_400(server, path, body, param):
    response = httpx.post(server.url + path, json=body, headers=HEADERS)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 400 and error["message"]
    if param is not None:
        assert error["param"] == param


def test_constrained_outputs(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 8},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                      "maxItems": 2}}}
    messages = [{"role": "user", "content": "describe it"}]
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    response = client.chat.completions.create(model="tiny", messages=messages, n=2, seed=5,
                                              max_tokens=60, response_format=response_format)
    for choice in response.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason == "stop"
    stream = client.chat.completions.create(model="tiny", messages=messages, n=2, seed=5,
                                            max_tokens=60, response_format=response_format,
                                            stream=True)
    streamed = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in response.choices]
    anything = client.chat.completions.create(model="tiny", messages=messages, max_tokens=200,
                                              response_format={"type": "json_object"}, seed=1)
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    for body in ({"guided_choice": ["left", "right"]},
                 {"structured_outputs": {"choice": ["left", "right"]}}):
        chosen = client.completions.create(model="tiny", prompt="go", max_tokens=8, n=3,
                                           temperature=1.0, extra_body=body)
        assert all(c.text in ("left", "right") for c in chosen.choices)


def test_a_constraint_past_the_grammar_engines_limits_is_an_error(server):
    """700 object branches make llguidance give up after the first tokens (a row of 13,300
    Earley items; its limit is 2,000): the client gets that as an error, a 400 or an
    in-band one in a stream, where it used to get finish_reason "abort" and no word why."""
    schema = {"anyOf": [{"type": "object", "properties": {
        f"field_{i}_{j}": {"type": "string"} for j in range(3)}} for i in range(700)]}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "n": 2,
            "max_tokens": 20, "response_format": {"type": "json_schema", "json_schema": {
                "name": "wide", "schema": schema}}}
    reply = httpx.post(server.url + "/v1/chat/completions", headers=HEADERS, json=body,
                       timeout=120)
    assert reply.status_code == 400, reply.text
    assert "max is 2000" in reply.json()["error"]["message"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=HEADERS,
                      json={**body, "stream": True}, timeout=120) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == 400 and "max is 2000" in error["message"], events[-2]
    assert events[-1] == "data: [DONE]"


def test_too_long_and_invalid_json(server):
    response = httpx.post(server.url + "/v1/completions", headers=HEADERS,
                          json={"model": "tiny", "prompt": [5] * 100, "max_tokens": 4000})
    assert response.status_code == 400
    assert "100" in response.json()["error"]["message"]
    assert "4000" in response.json()["error"]["message"]
    response = httpx.post(server.url + "/v1/completions", content=b"{not json",
                          headers={**HEADERS, "Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_auth_and_unknown_model(server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    wrong = httpx.post(server.url + "/v1/completions", json=body,
                       headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/metrics", headers=HEADERS).status_code == 200
    missing = httpx.post(server.url + "/v1/completions", headers=HEADERS,
                         json={**body, "model": "gpt-4"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert httpx.post(server.url + "/v1/completions", headers=HEADERS,
                      json={**body, "model": "other-name"}).status_code == 200


def test_info_endpoints(server, offline):
    models = httpx.get(server.url + "/v1/models", headers=HEADERS).json()
    assert [m["id"] for m in models["data"]] == ["tiny", "other-name"]
    assert models["data"][0]["max_model_len"] == 4096 and models["data"][0]["root"]
    assert httpx.get(server.url + "/version").json()["version"]
    tokens = httpx.post(server.url + "/tokenize", headers=HEADERS,
                        json={"model": "tiny", "prompt": "class Stack:"}).json()
    assert tokens["tokens"] == offline.get_tokenizer().encode("class Stack:")
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 4096
    chat_tokens = httpx.post(server.url + "/tokenize", headers=HEADERS,
                             json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat_tokens["count"] > 2
    text = httpx.post(server.url + "/detokenize", headers=HEADERS,
                      json={"model": "tiny", "tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "class Stack:"}


def test_metrics_move(server, client):
    before_prompt = metric(server, "kvflow:prompt_tokens_total")
    before_gen = metric(server, "kvflow:generation_tokens_total")
    before_ok = metric(server, "kvflow:request_success_total", 'finished_reason="length"')
    client.completions.create(model="tiny", prompt="abc", max_tokens=7,
                              extra_body={"ignore_eos": True})
    assert metric(server, "kvflow:generation_tokens_total") == before_gen + 7
    assert metric(server, "kvflow:prompt_tokens_total") > before_prompt
    assert metric(server, "kvflow:request_success_total",
                  'finished_reason="length"') == before_ok + 1
    text = httpx.get(server.url + "/metrics", headers=HEADERS).text
    for name in ("kvflow:time_to_first_token_seconds_bucket",
                 "kvflow:inter_token_latency_seconds_bucket",
                 "kvflow:e2e_request_latency_seconds_bucket",
                 "kvflow:request_queue_time_seconds_bucket", "kvflow:num_requests_waiting",
                 "kvflow:num_preemptions_total"):
        assert name + "{" in text and 'model_name="tiny"' in text


def test_full_queue_gets_503_and_others_survive(checkpoint, tmp_path):
    # The running request is a stream far longer than the test, however fast the engine
    # decodes, so the queue stays full until the test ends that stream.
    model = checkpoint("qwen3", max_position_embeddings=65536)
    process = ServerProcess(model, *ENGINE_FLAGS[:-1], "80MiB", "--max-num-seqs", "1",
                            "--max-waiting-requests", "1", "--served-model-name", "tiny",
                            log=tmp_path / "serve.log")
    try:
        process.wait_ready()
        endless = {"model": "tiny", "prompt": "x", "max_tokens": 60000, "ignore_eos": True,
                   "stream": True}
        short = {"model": "tiny", "prompt": "x", "max_tokens": 50, "ignore_eos": True}

        async def until_waiting() -> None:
            deadline = time.monotonic() + 30
            while metric(process, "kvflow:num_requests_waiting") < 1:
                assert time.monotonic() < deadline, "no request reached the waiting queue"
                await asyncio.sleep(0.05)

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=process.url, timeout=120) as http:
                async with http.stream("POST", "/v1/completions", json=endless) as stream:
                    lines = stream.aiter_lines()  # held: dropping it would close the stream
                    await anext(lines)
                    queued = asyncio.create_task(http.post("/v1/completions", json=short))
                    await until_waiting()
                    rejected = await http.post("/v1/completions", json=short)
                # Leaving the stream aborts it, which lets the queued request run.
                return await queued, rejected

        finished, rejected = asyncio.run(scenario())
        assert rejected.status_code == 503 and rejected.headers["Retry-After"]
        assert rejected.json()["error"]["code"] == 503
        assert finished.status_code == 200 and finished.json()["usage"]["completion_tokens"] == 50
        assert json.loads(httpx.get(process.url + "/health").text or "{}") == {}
    finally:
        assert process.stop()


def test_shutdown_bounded_with_a_stream_running(checkpoint, tmp_path):
    # A stream far longer than the shutdown timeout, however fast the engine decodes.
    model = checkpoint("qwen3", max_position_embeddings=65536)
    process = ServerProcess(model, *ENGINE_FLAGS, "--kv-cache-memory", "80MiB",
                            "--shutdown-timeout", "2", log=tmp_path / "serve.log")
    process.wait_ready()
    body = {"prompt": "while True:", "max_tokens": 60000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", process.url + "/v1/completions", json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        started = time.monotonic()
        assert process.stop(timeout=30), process.log_path.read_text()[-3000:]
        assert time.monotonic() - started < 15
        remaining = [line for line in lines if line]  # the stream ends instead of hanging
    assert remaining[-1] == "data: [DONE]"
    assert "shutting down" in remaining[-2]


def test_health_is_503_when_the_model_cannot_load(tmp_path):
    process = ServerProcess(broken_checkpoint(tmp_path / "broken"), "--device", "cpu",
                            log=tmp_path / "serve.log")
    try:
        response = process.wait_load_failure()
        assert response.status_code == 503
        assert "FancyForCausalLM" in response.json()["error"]["message"]
        completion = httpx.post(process.url + "/v1/completions", json={"prompt": "x"})
        assert completion.status_code == 503
    finally:
        assert process.stop()


def test_prefix_cache_usage_metrics_salt_and_reset(server, client):
    prompt = list(range(30, 130))  # 6 full blocks of 16 and 4 tokens
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "ignore_eos": True}

    def cached(**extra) -> int:
        response = httpx.post(server.url + "/v1/completions", headers=HEADERS,
                              json={**body, **extra})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    before_queries = metric(server, "kvflow:prefix_cache_queries_total")
    before_hits = metric(server, "kvflow:prefix_cache_hits_total")
    assert cached() == 0
    assert cached() == 96
    assert metric(server, "kvflow:prefix_cache_queries_total") == before_queries + 200
    assert metric(server, "kvflow:prefix_cache_hits_total") == before_hits + 96
    assert cached(cache_salt="tenant-b") == 0 and cached(cache_salt="tenant-b") == 96
    assert httpx.post(server.url + "/v1/completions", headers=HEADERS,
                      json={**body, "cache_salt": ""}).status_code == 400

    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    usage = [chunk.usage for chunk in stream][-1]
    assert usage.prompt_tokens_details.cached_tokens == 96

    messages = [{"role": "user", "content": "def fibonacci(n): " * 12}]
    chats = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
             for _ in range(2)]
    assert chats[0].usage.prompt_tokens_details.cached_tokens == 0
    assert chats[1].usage.prompt_tokens_details.cached_tokens > 0

    assert httpx.post(server.url + "/reset_prefix_cache").status_code == 401
    assert httpx.post(server.url + "/reset_prefix_cache", headers=HEADERS).status_code == 200
    assert cached() == 0


def test_api_key_scheme_is_case_insensitive_and_401_says_how(server):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 1}
    ok = httpx.post(server.url + "/v1/completions", json=body,
                    headers={"Authorization": f"bearer {API_KEY}"})
    assert ok.status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        denied = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert denied.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("method, path, names", [
    ("POST", "/v1/embeddings", "embeddings"),
    ("GET", "/v1/audio/voices", "audio"),
    ("POST", "/v1/fine_tuning/jobs", "fine-tuning"),
    ("POST", "/v1/assistants", "/v1/responses"),
    ("POST", "/pooling", "pooling"),
    ("GET", "/v1/no/such/api", "/v1/chat/completions"),
])
def test_unserved_apis_get_501_naming_the_api(server, method, path, names):
    response = httpx.request(method, server.url + path, headers=HEADERS, json={})
    assert response.status_code == 501, response.text
    error = response.json()["error"]
    assert error["code"] == 501 and error["type"] == "not_supported_error"
    assert names in error["message"]
    wrong_method = httpx.get(server.url + "/v1/chat/completions", headers=HEADERS)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


def test_a_model_by_id(server, client):
    assert client.models.retrieve("other-name").id == "other-name"
    card = httpx.get(server.url + "/v1/models/tiny", headers=HEADERS).json()
    assert card["id"] == "tiny" and card["max_model_len"] == 4096
    missing = httpx.get(server.url + "/v1/models/org/gpt-4", headers=HEADERS)
    assert missing.status_code == 404
    assert "'tiny', 'other-name'" in missing.json()["error"]["message"]
