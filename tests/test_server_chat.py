"""The server's chat controls, as agents use them: a chat template of the server's own
(--chat-template), chat_template_kwargs, continue_final_message and add_generation_prompt;
the model's sampling defaults (generation_config.json) for what requests leave unset; tool
calls, forced and parsed (--enable-auto-tool-choice --tool-call-parser hermes)."""
from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import openai
import pytest
from server_process import ServerProcess, hermes_tool_flags, running

ENGINE_FLAGS = ("--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB")
HI = [{"role": "user", "content": "hi"}]
# The checkpoint's recommended sampling: greedy, top_k 5, 6 new tokens.
RECOMMENDED = {"temperature": 0, "top_k": 5, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recommended") / "model"
    shutil.copytree(checkpoint("qwen3", max_position_embeddings=4096), folder)
    (folder / "generation_config.json").write_text(json.dumps(RECOMMENDED))
    return folder


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server-chat")
    with running(model_dir, *ENGINE_FLAGS, "--served-model-name", "tiny",
                 *hermes_tool_flags(folder), log=folder / "serve.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _tokens(server, **body) -> list[int]:
    response = httpx.post(server.url + "/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_the_servers_template_and_its_kwargs(server, client, tokenizer):
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    assert _tokens(server, messages=HI) == encode("<|user|>hi<|end|><|assistant|>")
    assert _tokens(server, messages=HI, chat_template_kwargs={"enable_thinking": False}) == \
        encode("<|user|>hi<|end|><|assistant|><think>\n\n</think>\n\n")
    partial = [*HI, {"role": "assistant", "content": "Hello, I"}]
    assert _tokens(server, messages=partial, add_generation_prompt=False,
                   continue_final_message=True) == encode("<|user|>hi<|end|><|assistant|>Hello, I")
    chat = client.chat.completions.create(
        model="tiny", messages=partial, max_tokens=2, extra_body={
            "add_generation_prompt": False, "continue_final_message": True})
    assert chat.usage.prompt_tokens == len(encode("<|user|>hi<|end|><|assistant|>Hello, I"))
    chat = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert chat.usage.prompt_tokens == len(
        encode("<|user|>hi<|end|><|assistant|><think>\n\n</think>\n\n"))


@pytest.mark.parametrize("body, param, message", [
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs",
     "may not set tokenize"),
    ({"chat_template_kwargs": {"tools": [], "conversation": []}}, "chat_template_kwargs",
     "conversation, tools"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs", None),
    ({"chat_template_kwargs": {"x": "<|system|>"}}, "chat_template_kwargs", "special token"),
    ({"continue_final_message": True}, "continue_final_message", "cannot both be true"),
    ({"continue_final_message": True, "add_generation_prompt": False},
     "continue_final_message", "must be the assistant's"),
    ({"messages": [*HI, {"role": "assistant", "content": "a"}], "continue_final_message": True},
     "continue_final_message", "cannot both be true"),
    ({"chat_template": "{{ messages }}"}, "chat_template", "--chat-template"),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt", None),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_bad_chat_controls_get_400(server, path, body, param, message):
    response = httpx.post(server.url + path, json={"messages": HI, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if message is not None:
        assert message in error["message"]


def test_the_checkpoints_defaults_fill_what_requests_leave_unset(server, client, model_dir):
    from kvflow import LLM, SamplingParams

    assert "sampling defaults from " in server.log_path.read_text()
    prompt = "def fibonacci(n):"
    unset = client.completions.create(model="tiny", prompt=prompt,
                                      extra_body={"ignore_eos": True})
    greedy = client.completions.create(model="tiny", prompt=prompt, temperature=0,
                                       max_tokens=6, extra_body={"ignore_eos": True})
    assert unset.usage.completion_tokens == 6  # max_new_tokens, not the field's 16
    assert unset.choices[0].text == greedy.choices[0].text
    # A request's own values win; the defaults it leaves unset (top_k) still apply.
    offline = LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory="4MiB",
                  generation_config="vllm")
    for seed in range(3):
        sampled = client.completions.create(model="tiny", prompt=prompt, temperature=1.0,
                                            seed=seed, max_tokens=8,
                                            extra_body={"ignore_eos": True})
        expected = offline.generate(prompt, SamplingParams(temperature=1.0, top_k=5, seed=seed,
                                                           max_tokens=8, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].text
        assert sampled.choices[0].text == expected
    chat = client.chat.completions.create(model="tiny", messages=HI,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 6
    chat = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=3,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
        "additionalProperties": False}}}
NO_PARAMETERS = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, TIME, NO_PARAMETERS]
SCHEMAS = {tool["function"]["name"]: tool["function"].get("parameters", {
    "type": "object", "additionalProperties": False}) for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _chat(server, stream: bool = False, **body) -> dict:
    """A chat completion's body; a stream is reassembled into the same shape."""
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 300,
            "stream": stream, **body}
    if not stream:
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()
    choices: dict[int, dict] = {}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                message = choices.setdefault(choice["index"], {
                    "index": choice["index"], "message": {"role": None, "content": None},
                    "finish_reason": None})
                delta = choice["delta"]
                message["message"]["role"] = delta.get("role", message["message"]["role"])
                for key in ("content", "reasoning_content"):
                    if delta.get(key):
                        message["message"][key] = (message["message"].get(key) or "") + \
                            delta[key]
                for call in delta.get("tool_calls", []):
                    calls = message["message"].setdefault("tool_calls", [])
                    if call["index"] == len(calls):
                        calls.append({"id": call["id"], "type": call["type"],
                                      "function": dict(call["function"])})
                    else:
                        calls[call["index"]]["function"]["arguments"] += \
                            call["function"]["arguments"]
                message["finish_reason"] = choice["finish_reason"] or message["finish_reason"]
    return {"choices": [choices[i] for i in sorted(choices)]}


def _without_ids(body: dict) -> list[dict]:
    choices = []
    for choice in body["choices"]:
        message = dict(choice["message"])
        message["tool_calls"] = [call["function"] for call in message.get("tool_calls", [])]
        choices.append({"message": message, "finish_reason": choice["finish_reason"]})
    return choices


def _check_calls(body: dict, names: set[str], may_be_cut: bool = False) -> list[dict]:
    calls = []
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls" or (
            may_be_cut and choice["finish_reason"] == "length"), choice
        assert choice["message"]["content"] is None
        for call in choice["message"]["tool_calls"]:
            assert call["type"] == "function" and call["id"].startswith("call_")
            assert call["function"]["name"] in names
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                SCHEMAS[call["function"]["name"]])
            calls.append(call["function"])
    return calls


@pytest.mark.parametrize("seed", range(4))
def test_a_named_function_is_always_called_with_valid_arguments(server, seed):
    body = _chat(server, temperature=1.0, seed=seed, n=2,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert len(_check_calls(body, {"get_weather"})) == 2
    streamed = _chat(server, stream=True, temperature=1.0, seed=seed, n=2,
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert _without_ids(streamed) == _without_ids(body)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_always_parse_and_name_declared_functions(server, seed, parallel):
    body = _chat(server, temperature=1.0, seed=seed, tool_choice="required",
                 parallel_tool_calls=parallel)
    # A random model may add calls to the array until max_tokens: the calls it completed
    # are returned, with finish_reason "length".
    calls = _check_calls(body, set(SCHEMAS), may_be_cut=parallel)
    assert len(calls) >= 1 and (parallel or len(calls) == 1)
    streamed = _chat(server, stream=True, temperature=1.0, seed=seed, tool_choice="required",
                     parallel_tool_calls=parallel)
    assert _without_ids(streamed) == _without_ids(body)


# A pydantic model's schema, as SDKs send it: nested models as $defs and local $refs.
TRIP = {"type": "function", "function": {"name": "plan_trip", "parameters": {
    "$defs": {"City": {"type": "object", "properties": {"name": {"type": "string",
                                                                   "maxLength": 10}},
                       "required": ["name"], "additionalProperties": False}},
    "type": "object", "properties": {"origin": {"$ref": "#/$defs/City"},
                                     "stops": {"type": "array", "maxItems": 2,
                                               "items": {"$ref": "#/$defs/City"}}},
    "required": ["origin", "stops"], "additionalProperties": False}}}


@pytest.mark.parametrize("seed", range(3))
def test_required_calls_take_tools_whose_schemas_use_local_refs(server, seed):
    """Embedded in the combined schema of every tool, "#/$defs/City" named nothing: the
    request was a 400 ("Pointer ... does not exist")."""
    body = _chat(server, temperature=1.0, seed=seed, tool_choice="required",
                 tools=[TRIP, TIME], parallel_tool_calls=False)
    schemas = {"plan_trip": TRIP["function"]["parameters"], **SCHEMAS}
    for call in body["choices"][0]["message"]["tool_calls"]:
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            schemas[call["function"]["name"]])


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                  "function": {"name": "get_weather"}}])
def test_a_forced_call_wins_over_response_format(server, choice):
    """A forced call's arguments are the output, so response_format (which shapes a
    message's text) gives way to it, as in vLLM; it was a 400 that instructor's Responses
    mode, which sends both, failed on. The format is still validated."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    for response_format in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {
            "name": "n", "schema": schema, "strict": True}}):
        body = _chat(server, temperature=1.0, seed=0, tool_choice=choice,
                     parallel_tool_calls=False, response_format=response_format)
        assert len(_check_calls(body, set(SCHEMAS))) == 1
    response = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": ASK, "tools": TOOLS, "max_tokens": 2, "tool_choice": choice,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n"}}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


# The model is made to write exactly this (a choice of one string), then parsed as hermes.
SCRIPTED = ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
            '"Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
            '"arguments": {"zone": "CET"}}\n</tool_call>')


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_several_hermes_calls_and_leaves_plain_text_alone(server, stream):
    body = _chat(server, stream=stream, structured_outputs={"choice": [SCRIPTED]})
    choice, = _without_ids(body)
    assert choice == {"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Checking both.", "tool_calls": [
            {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            {"name": "get_time", "arguments": '{"zone": "CET"}'}]}}
    plain = "No call here: 1 < 2 and <tool_call> is only text."
    body = _chat(server, stream=stream, structured_outputs={"choice": [plain]},
                 tool_choice="auto")
    choice, = _without_ids(body)
    assert choice == {"finish_reason": "stop", "message": {
        "role": "assistant", "content": plain, "tool_calls": []}}
    # tool_choice "none": the same text is left as it is.
    body = _chat(server, stream=stream, structured_outputs={"choice": [SCRIPTED]},
                 tool_choice="none")
    choice, = _without_ids(body)
    assert choice["message"]["content"] == SCRIPTED and choice["finish_reason"] == "stop"


def test_tool_calls_and_results_in_the_conversation_reach_the_template(server, tokenizer):
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    tools = [NO_PARAMETERS]
    expected = ('<|system|>Tools: [{"type": "function", "function": {"name": "ping"}}]<|end|>'
                "<|user|>What is the weather in Paris?<|end|>"
                '<|assistant|><tool_call>{"name": "get_weather", "arguments": '
                '{"city": "Paris"}}</tool_call><|end|>'
                "<|tool|><tool_response>sunny</tool_response><|end|><|assistant|>")
    tokens = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    chat = _chat(server, messages=messages, tools=tools, tool_choice="none", max_tokens=1)
    assert chat["usage"]["prompt_tokens"] == len(tokenizer.encode(
        expected, add_special_tokens=False))
    assert tokens["count"] < chat["usage"]["prompt_tokens"]  # no tools listed there


@pytest.mark.parametrize("body, param, message", [
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "more than once"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"not": {}}}}}}], "tool_choice": "required"},
     "tools", "cannot be compiled"),
    ({"tool_choice": "required", "guided_regex": "a+"}, "tool_choice",
     "as guided_regex does"),
    ({"tool_choice": "sometimes"}, "tool_choice", None),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages", "JSON text"),
])
def test_bad_tool_requests_get_400(server, body, param, message):
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": ASK, "tools": TOOLS, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if message is not None:
        assert message in error["message"]


@pytest.fixture(scope="module")
def reasoning_server(model_dir, tmp_path_factory):
    with running(model_dir, *ENGINE_FLAGS, "--served-model-name", "tiny",
                 "--reasoning-parser", "qwen3",
                 log=tmp_path_factory.mktemp("reasoning") / "serve.log") as process:
        yield process


def _message(server, stream: bool = False, **body) -> dict:
    return _chat(server, stream=stream, tools=None, messages=HI, **body)["choices"][0]


@pytest.mark.parametrize("seed", range(3))
def test_reasoning_is_split_from_the_answer(server, reasoning_server, seed):
    from kvflow.server.reasoning_parsers import get_reasoning_parser

    request = {"temperature": 1.0, "seed": seed, "max_tokens": 24}
    text = _message(server, **request)["message"]["content"]
    reasoning, answer = get_reasoning_parser("qwen3").split(text, final=True)
    message = _message(reasoning_server, **request)["message"]
    assert message["reasoning_content"] == (reasoning or None)
    assert message["content"] == (answer or None)
    streamed = _message(reasoning_server, stream=True, **request)["message"]
    assert streamed["content"] == message["content"]
    assert streamed.get("reasoning_content") == message["reasoning_content"]


def test_structured_output_constrains_the_answer_after_reasoning(reasoning_server, tokenizer):
    # With no token starting with "<", the model cannot open a reasoning block: the grammar
    # (an optional <think> block, then the schema) leaves it the JSON alone.
    banned = {str(i): -100 for token, i in tokenizer.get_vocab().items()
              if token.startswith("<")}
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    for seed in range(3):
        choice = _message(reasoning_server, temperature=1.0, seed=seed, max_tokens=40,
                          logit_bias=banned, response_format={
                              "type": "json_schema", "json_schema": {"name": "n",
                                                                     "schema": schema}})
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["reasoning_content"] is None
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


# SmolLM2-Instruct's way with messages (ChatML, message['content'] read directly), with its
# tools written as hermes does: a template that fails on a message without content.
CHATML_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{%- for call in message.tool_calls or [] %}<tool_call>\n{\"name\": \""
    "{{ call.function.name }}\", \"arguments\": {{ call.function.arguments | tojson }}}"
    "\n</tool_call>{%- endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chatml_server(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server-chatml")
    template = folder / "chatml.jinja"
    template.write_text(CHATML_TOOLS_TEMPLATE)
    process = ServerProcess(model_dir, *ENGINE_FLAGS, "--served-model-name", "tiny",
                            "--chat-template", str(template), "--enable-auto-tool-choice",
                            "--tool-call-parser", "hermes", log=folder / "serve.log")
    process.wait_ready()
    yield process
    assert process.stop(), process.log_path.read_text()[-3000:]


def test_an_agent_loop_sends_the_tool_result_back_with_the_openai_client(chatml_server):
    """The second turn of every agent loop: the assistant's tool-call message, as the client
    returns it ("content": null), then the tool's result. It once failed on templates that
    read message['content']."""
    client = openai.OpenAI(base_url=chatml_server.url + "/v1", api_key="none", max_retries=0)
    call = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call>')
    messages: list = [*ASK]
    first = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                           max_tokens=300,
                                           extra_body={"structured_outputs": {"choice": [call]}})
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.content is None
    (tool_call,) = message.tool_calls
    assert json.loads(tool_call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    messages.append(message)  # as the openai examples do: content None, tool_calls
    messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": "sunny, 21 C"})
    second = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                            max_tokens=5)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The rendered conversation: the call and its result, content empty where it was null.
    rendered = httpx.post(chatml_server.url + "/tokenize", json={
        "messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            tool_call.model_dump()]}, messages[-1]], "add_generation_prompt": False})
    assert rendered.status_code == 200, rendered.text
    parts = [{"type": "text", "text": "What is the weather"}, {"type": "text", "text": "?"}]
    listed = httpx.post(chatml_server.url + "/tokenize", json={
        "messages": [{"role": "user", "content": parts}]})
    assert listed.status_code == 200, listed.text
