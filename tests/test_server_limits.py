"""Hardening, round 2: what once crashed or disabled a real `kvflow serve` (in bf16, the
CPU's default dtype), and the limits that now stop it, each with the 400 that names it."""
from __future__ import annotations

import asyncio
import json
import re
import random
import time

import httpx
import pytest
from fuzz_requests import chat_request
from server_process import ServerProcess, api_error as _error

FLAGS = ("--dtype", "bfloat16", "--device", "cpu", "--kv-cache-memory", "16MiB",
         "--served-model-name", "tiny", "--max-num-seqs", "8", "--enable-auto-tool-choice",
         "--tool-call-parser", "hermes")
# Writes with tojson, and then drops, all that a client may nest: tools, tool-call
# arguments, a message's extra field x and the template argument `extra`.
TEMPLATE = (
    "{%- for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{%- for call in m['tool_calls'] or [] %}{{ (call['function'] | tojson)[:0] }}"
    "{%- endfor %}{% if m['x'] is defined %}{{ (m['x'] | tojson)[:0] }}{% endif %}<|end|>"
    "{%- endfor %}{% if tools %}{{ (tools | tojson)[:0] }}{% endif %}"
    "{%- if extra is defined %}{{ (extra | tojson)[:0] }}{% endif %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    model = checkpoint("qwen3", max_position_embeddings=4096)
    folder = tmp_path_factory.mktemp("limits")
    (folder / "template.jinja").write_text(TEMPLATE)
    process = ServerProcess(model, *FLAGS, "--chat-template", str(folder / "template.jinja"),
                            log=folder / "serve.log")
    process.wait_ready()
    yield process
    assert process.stop(), process.log_path.read_text()[-3000:]


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


def _ref_chain(n: int) -> dict:
    defs = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(n)}
    defs[f"a{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/a0"}


def _chat(server, **fields) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields})


def test_constraints_that_overflowed_llguidance_are_400_naming_the_limit(server):
    """Each of these once killed the process with SIGSEGV."""
    schema = _ref_chain(1000)
    message = _error(_chat(server, response_format={
        "type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}),
        400, "response_format")
    assert "1,003 levels deep; the limit is 128" in message
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    message = _error(_chat(server, tools=[tool], tool_choice={
        "type": "function", "function": {"name": "f"}}), 400, "tools")
    assert "the limit is 128" in message
    lark = "\n".join(["start: r0"] + [f"r{i}: r{i + 1}" for i in range(3000)] + ['r3000: "x"'])
    assert "the limit is 128" in _error(_chat(server, guided_grammar=lark), 400,
                                        "guided_grammar")
    gbnf = "\n".join(["root ::= r0"] + [f"r{i} ::= r{i + 1}" for i in range(10000)]
                     + ['r10000 ::= "x"'])
    assert "the limit is 65,536" in _error(_chat(server, guided_grammar=gbnf), 400,
                                           "guided_grammar")
    _healthy(server)


def _tool(name: str, parameters: dict | None = None) -> dict:
    function = {"name": name} if parameters is None else {"name": name,
                                                          "parameters": parameters}
    return {"type": "function", "function": function}


def test_tool_lists_are_capped_and_checked_in_linear_time(server):
    """80,000 tools once took 79 s of a tokenizer thread: names.count for every name."""
    many = [_tool(f"f{i}") for i in range(20_000)]
    assert "20,000 entries; at most 128" in _error(_chat(server, tools=many), 400, "tools")
    allowed = [_tool(f"f{i}") for i in range(128)]
    assert _chat(server, tools=allowed, tool_choice="none").status_code == 200
    repeated = allowed[:-1] + [_tool("f7")]
    assert "declares f7 more than once" in _error(_chat(server, tools=repeated), 400, "tools")
    messages = [{"role": "user", "content": "hi"}] * 4097
    assert "at most 4,096" in _error(_chat(server, messages=messages), 400, "messages")
    _healthy(server)


def test_the_responses_and_messages_apis_count_their_lists_before_validating_them(server):
    """The entries here are all invalid: they are counted first, and not validated."""
    for path, body, param in (
            ("/v1/responses", {"input": [{"role": "nobody"}] * 4097}, "input"),
            ("/v1/responses", {"input": "hi", "tools": [{"type": "nonesuch"}] * 129}, "tools"),
            ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                              "tools": [{"nonesuch": 1}] * 129}, None)):
        response = httpx.post(server.url + path, json=body, timeout=60)
        assert response.status_code == 400, response.text
        if param is not None:  # Anthropic's error shape has no param
            assert response.json()["error"]["param"] == param
        assert "at most" in response.json()["error"]["message"], response.text


def test_a_request_whose_client_left_is_dropped_before_it_is_prepared(server):
    """Its validation and template wait for a tokenizer thread; once the client has gone,
    they never run. How long the threads stay busy depends on the CPU: each try queues more
    tokenizer work ahead of the request, until its client gives up before its turn."""
    prompt = "def fibonacci(n): return n, hello world\n" * (1_500_000 // 40)

    async def client_gave_up(num_busy: int) -> bool:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            busy = [asyncio.create_task(http.post("/tokenize", json={"prompt": prompt}))
                    for _ in range(num_busy)]
            await asyncio.sleep(0.5)
            try:
                await http.post("/v1/chat/completions", timeout=0.5, json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                gave_up = False
            except httpx.TimeoutException:
                gave_up = True
            assert [r.status_code for r in await asyncio.gather(*busy)] == [200] * num_busy
            return gave_up

    def dropped_unprepared(num_busy: int) -> bool:
        # A client that gave up after its request was prepared (the threads freed up
        # within its wait) is aborted instead: then the next try queues more work.
        if not asyncio.run(client_gave_up(num_busy)):
            return False
        time.sleep(0.2)
        return "client disconnected before its request was prepared" in \
            server.log_path.read_text()

    assert any(dropped_unprepared(num_busy) for num_busy in (2, 6, 16, 32)), \
        "the tokenizer threads were never busy for long enough"
    _healthy(server)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _raw_chat(server, body: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                      headers={"content-type": "application/json"})


HI = '[{"role": "user", "content": "hi"}]'
DEEP_ARGUMENTS = json.dumps([{"role": "user", "content": "hi"}, {
    "role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": _nested(5000)}}]}])


# Each nests past 256 levels; each was a 500 (a RecursionError) or a dropped connection.
@pytest.mark.parametrize("body, param", [
    (f'{{"messages": {DEEP_ARGUMENTS}}}', "messages"),
    (f'{{"messages": {HI}, "guided_json": {json.dumps(_nested(5000))}}}', "guided_json"),
    (f'{{"messages": {HI}, "chat_template_kwargs": {{"extra": {_nested(400)}}}}}',
     "chat_template_kwargs"),
    (f'{{"messages": {HI}, "tools": [{{"type": "function", "function": {{"name": "f", '
     f'"parameters": {{"x": {_nested(400)}}}}}}}]}}', "tools"),
    (f'{{"messages": [{{"role": "user", "content": "hi", "x": {_nested(300)}}}]}}',
     "messages"),
    (f'{{"messages": {HI}, "stop": {_nested(100_000)}}}', "stop"),
])
def test_json_nested_past_the_limit_is_400_naming_the_field(server, body, param):
    assert "the limit is 256" in _error(_raw_chat(server, body), 400, param)
    _healthy(server)


def test_json_nested_past_the_limit_is_400_in_anthropics_shape_on_its_routes(server):
    body = f'{{"max_tokens": 2, "messages": [{{"role": "user", "content": {_nested(300)}}}]}}'
    response = httpx.post(server.url + "/v1/messages", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "error"
    assert "the limit is 256" in response.json()["error"]["message"]


def test_json_nested_to_the_limit_is_served(server):
    """256 levels, counted from the request body's own braces, in every field that reaches
    the template (which writes them with tojson)."""
    arguments = json.dumps('{"a": ' + _nested(255) + "}")
    for body in (
            f'{{"messages": {HI}, "chat_template_kwargs": {{"extra": {_nested(254)}}}}}',
            f'{{"messages": {HI}, "tool_choice": "none", "tools": [{{"type": "function", '
            f'"function": {{"name": "f", "parameters": {{"x": {_nested(250)}}}}}}}]}}',
            f'{{"messages": [{{"role": "user", "content": "hi", "x": {_nested(253)}}}]}}',
            f'{{"messages": [{{"role": "user", "content": "hi"}}, {{"role": "assistant", '
            f'"tool_calls": [{{"id": "c", "type": "function", "function": {{"name": "f", '
            f'"arguments": {arguments}}}}}]}}]}}'):
        response = _raw_chat(server, body[:-1] + ', "max_tokens": 2}')
        assert response.status_code == 200, response.text


def _stream_events(server, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=300,
                      json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


# A model's output forced deeper than Python's json can parse (1,100 tokens, one bracket
# each): the hermes parser failed the response with a RecursionError (tests/
# test_tool_parsers.py has "required", whose schemas cannot force such an output).
OPENING = r'<tool_call>\{"name": "f", "arguments": \{"a": \[{2000}'


def test_a_models_over_deep_hermes_call_is_not_parsed(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [_tool("f")],
            "max_tokens": 1100}
    # A call that opens as hermes calls do: its arguments cannot be read to their end, so
    # they run to the end of the output, as unreadable arguments do.
    response = _chat(server, **body, guided_regex=OPENING)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    arguments = choice["message"]["tool_calls"][0]["function"]["arguments"]
    assert arguments.startswith('{"a": [[[') and len(arguments) > 1000
    # A block read once it closes: over-deep, it stays content as written.
    events = _stream_events(server, {**body, "guided_regex": r"<tool_call>\[{2000}"})
    assert not any("error" in event for event in events)
    deltas = [event["choices"][0]["delta"] for event in events if event["choices"]]
    assert not any("tool_calls" in delta for delta in deltas)
    content = "".join(delta.get("content") or "" for delta in deltas)
    assert content.startswith("<tool_call>[[[") and len(content) > 1000
    _healthy(server)


@pytest.mark.parametrize("fields, param, says", [
    ({"stop": [f"s{i}" for i in range(129)]}, "stop", "stop has 129 entries; at most 128"),
    ({"stop": ["x" * 3000, "y" * 2000]}, "stop", "stop has 5000 characters; at most 4096"),
    ({"allowed_token_ids": list(range(300)) * 1366}, "allowed_token_ids",
     "409800 entries; at most 1024"),
    ({"bad_words": ["w"] * 129}, "bad_words", "at most 128"),
    ({"stop_token_ids": [5] * 1025}, "stop_token_ids", "at most 1024"),
    ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias", "at most 1024"),
])
def test_lists_are_capped_naming_the_field(server, fields, param, says):
    response = httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"prompt": "hi", "max_tokens": 2, **fields})
    assert says in _error(response, 400, param)


def test_stop_strings_at_the_caps_are_served(server):
    stops = [f"{i:04d}" * 8 for i in range(128)]  # 128 strings, 4,096 characters
    response = httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"prompt": "hi", "max_tokens": 4, "stop": stops})
    assert response.status_code == 200, response.text


def test_a_regex_too_large_for_the_matcher_is_400_before_generation(server):
    """It was compiled lazily and failed after two tokens: 200, finish_reason "abort"."""
    message = _error(_chat(server, guided_regex="(a{1000}){1000}"), 400, "guided_regex")
    assert "too complex" in message and "too many expressions" in message


def test_a_constraint_the_matcher_gives_up_on_mid_output_is_an_error_that_says_so(server):
    """The pattern's lexer is built only past "b", where a compile's first mask does not
    reach."""
    schema = {"type": "object", "properties": {"b": {"type": "boolean"}, "a": {
        "type": "string", "pattern": "^(a{1000}){1000}$"}}, "required": ["b", "a"],
        "additionalProperties": False}
    fields = {"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "s", "schema": schema}},
              "max_tokens": 40}
    # llguidance gives up while it computes a mask (the mask job reports it) or when it
    # is handed a token (the scheduler does): either way the client hears why.
    gave_up = re.compile("(could no longer follow|went past a limit of the grammar engine)"
                         ".*too many expressions")
    message = _error(_chat(server, **fields), 400, "response_format")
    assert gave_up.search(message), message
    events = _stream_events(server, {"messages": [{"role": "user", "content": "hi"}],
                                     **fields})
    assert events[-1]["error"]["param"] == "response_format"
    assert gave_up.search(events[-1]["error"]["message"]), events[-1]
    # allowed_token_ids that leave the grammar nothing: the same error, not an abort.
    response = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "prompt": "hi", "max_tokens": 4, "guided_choice": ["yes"], "allowed_token_ids": [7]})
    assert "could no longer follow" in _error(response, 400, "guided_choice")
    _healthy(server)


@pytest.mark.parametrize("schema, says", [
    ({"type": "number", "multipleOf": -2}, "multipleOf must be greater than 0"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 0}}},
     "multipleOf must be greater than 0"),
    ({"type": "object", "x-guidance": {"whitespace_flexible": True}}, "x-guidance"),
])
def test_schemas_json_schema_forbids_or_that_would_change_kvflows_layout_are_400(
        server, schema, says):
    response = _chat(server, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert says in _error(response, 400, "response_format")


def test_a_multiple_of_in_data_is_not_a_keyword(server):
    schema = {"type": "object", "properties": {"a": {"const": {"multipleOf": -1}}}}
    response = _chat(server, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def keyed_server(checkpoint, tmp_path_factory):
    model = checkpoint("qwen3", max_position_embeddings=4096)
    process = ServerProcess(model, *FLAGS[:6], "--api-key", "sesame",
                            log=tmp_path_factory.mktemp("keyed") / "serve.log")
    process.wait_ready()
    yield process
    assert process.stop(), process.log_path.read_text()[-3000:]


def test_the_key_guards_metrics_load_and_ping(keyed_server):
    """/metrics counts prefix-cache hits, which tell whether someone sent a prompt."""
    key = {"Authorization": "Bearer sesame"}
    for path in ("/metrics", "/load", "/ping"):
        assert httpx.get(keyed_server.url + path).status_code == 401, path
        assert httpx.get(keyed_server.url + path, headers=key).status_code == 200, path
    for path in ("/health", "/version"):
        assert httpx.get(keyed_server.url + path).status_code == 200, path


def test_open_monitoring_opens_metrics_load_and_ping_only():
    from fastapi.testclient import TestClient

    from kvflow.engine.args import EngineArgs
    from kvflow.server.api_server import ServerArgs, create_app

    app = create_app(ServerArgs(engine=EngineArgs(model="unused"), api_key=["sesame"],
                                open_monitoring=True))
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: no model
    for path in ("/metrics", "/load", "/ping", "/health", "/version"):
        assert client.get(path).status_code != 401, path
    for path in ("/v1/models", "/reset_prefix_cache"):
        assert client.request("POST" if "reset" in path else "GET", path).status_code == 401


FUZZ_SECONDS = 8.0


def test_random_constraints_and_tool_lists_get_200_or_a_clean_400(server):
    """A fuzz target, bounded in time: random schemas, regexes, choices and tool lists
    within the limits (tests/fuzz_requests.py), some streamed. Each gets a 200 or a 400 in
    OpenAI's shape (in-band, for a stream that has started), never a 500 or a hang, and the
    server lives on."""
    rng = random.Random(24)
    deadline = time.monotonic() + FUZZ_SECONDS
    statuses: list[int] = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        while len(statuses) < 10 or time.monotonic() < deadline:
            body = chat_request(rng)
            if rng.random() < 0.3:
                with http.stream("POST", "/v1/chat/completions",
                                 json={**body, "stream": True}) as response:
                    response.read()
                errors = ([json.loads(line[6:])["error"] for line in response.text.splitlines()
                           if line.startswith('data: {"error"')]
                          if response.status_code == 200 else [response.json()["error"]])
            else:
                response = http.post("/v1/chat/completions", json=body)
                errors = [response.json()["error"]] if response.status_code != 200 else []
            assert response.status_code in (200, 400), (response.status_code, body)
            for error in errors:
                assert error["code"] == 400 and error["message"], (error, body)
            statuses.append(response.status_code)
    assert 200 in statuses and 400 in statuses, statuses
    _healthy(server)
