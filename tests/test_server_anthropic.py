"""POST /v1/messages (Anthropic's Messages API) and /v1/messages/count_tokens, driven by
the anthropic client against a real server that takes the key as x-api-key. The model has
random weights: its text is forced where a test needs to know it (structured_outputs'
choice of one string), its calls by tool_choice."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from server_process import hermes_tool_flags, running

anthropic = pytest.importorskip("anthropic", reason="the anthropic client is not installed")

API_KEY = "test-key"
ENGINE_FLAGS = ("--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB")
WEATHER_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"name": "get_weather", "description": "the weather in a city",
           "input_schema": WEATHER_SCHEMA}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def forced(text: str) -> dict:
    """extra_body that makes the model write exactly `text`."""
    return {"structured_outputs": {"choice": [text]}}


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server-anthropic")
    with running(checkpoint("qwen3", max_position_embeddings=4096), *ENGINE_FLAGS,
                 "--served-model-name", "tiny", "--api-key", API_KEY,
                 *hermes_tool_flags(folder), log=folder / "serve.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0,
                               timeout=120)


def test_system_and_a_tool_round_trip(server, client):
    first = client.messages.create(model="tiny", max_tokens=200, system="Be brief.",
                                   messages=ASK, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"})
    assert first.type == "message" and first.role == "assistant"
    assert first.id.startswith("msg_") and first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER_SCHEMA)
    conversation = [*ASK, {"role": "assistant", "content": first.content},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    second = client.messages.create(model="tiny", max_tokens=50, messages=conversation,
                                    system=[{"type": "text", "text": "Be brief."}],
                                    tools=[WEATHER], extra_body=forced("It is sunny."))
    assert [block.type for block in second.content] == ["text"]
    assert second.content[0].text == "It is sunny." and second.stop_reason == "end_turn"
    counted = client.messages.count_tokens(model="tiny", messages=conversation,
                                           system="Be brief.", tools=[WEATHER])
    assert counted.input_tokens == second.usage.input_tokens
    # The same turn as a chat conversation renders to the same prompt.
    chat = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    reference = chat.chat.completions.create(
        model="tiny", max_tokens=1, tool_choice="none", messages=[
            {"role": "system", "content": "Be brief."}, *ASK,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": json.dumps(call.input)}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
        tools=[{"type": "function", "function": {
            "name": "get_weather", "description": WEATHER["description"],
            "parameters": WEATHER_SCHEMA}}])
    assert reference.usage.prompt_tokens == second.usage.input_tokens


def test_any_forces_a_call_of_a_declared_tool(client):
    message = client.messages.create(model="tiny", max_tokens=200, messages=ASK,
                                     tools=[WEATHER], tool_choice={
                                         "type": "any", "disable_parallel_tool_use": True})
    assert [block.name for block in message.content] == ["get_weather"]
    assert message.stop_reason == "tool_use"


def test_stream_text_and_stop_sequences(client):
    text = "Hello there, friend. Bye."
    whole = client.messages.create(model="tiny", max_tokens=50, messages=ASK,
                                   stop_sequences=["friend"], extra_body=forced(text))
    assert whole.content[0].text == "Hello there, "
    assert (whole.stop_reason, whole.stop_sequence) == ("stop_sequence", "friend")
    with client.messages.stream(model="tiny", max_tokens=50, messages=ASK,
                                stop_sequences=["friend"], extra_body=forced(text)) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    deltas = events.count("content_block_delta")
    assert deltas > 1
    # The helper adds a "text" event after each text delta.
    assert events == ["message_start", "content_block_start",
                      *["content_block_delta", "text"] * deltas, "content_block_stop",
                      "message_delta", "message_stop"]
    assert final.content[0].text == "Hello there, "
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "friend")
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    with client.messages.stream(model="tiny", max_tokens=3, messages=ASK,
                                extra_body={"ignore_eos": True}) as stream:
        cut = stream.get_final_message()
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3


def test_a_streamed_tool_use_sends_its_input_as_json_deltas(client):
    with client.messages.stream(model="tiny", max_tokens=200, messages=ASK, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        partial = "".join(event.delta.partial_json for event in stream
                          if event.type == "content_block_delta")
        final = stream.get_final_message()
    (call,) = final.content
    assert call.type == "tool_use" and json.loads(partial) == call.input
    assert final.stop_reason == "tool_use"


@pytest.mark.parametrize("body, message", [
    ({"messages": ASK}, "max_tokens"),
    ({"max_tokens": 0, "messages": ASK}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "x"}}]}]}, "'image'"),
    ({"max_tokens": 5, "messages": [{"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "x", "content": "y"}]}]}, "user message"),
    ({"max_tokens": 5, "messages": ASK, "tools": [
        {"type": "web_search_20250305", "name": "web_search"}]}, "custom tools"),
    ({"max_tokens": 5, "messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "tool"}},
     "needs a name"),
    ({"max_tokens": 5, "messages": ASK, "tool_choice": {"type": "any"}}, "needs tools"),
    ({"max_tokens": 5, "messages": ASK, "stop_sequences": ["a"], "stop": ["b"]}, "not both"),
    ({"max_tokens": 5, "messages": ASK, "temperature": -1}, "temperature"),
])
def test_bad_requests_get_400_in_anthropics_shape(server, body, message):
    response = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": API_KEY})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert message in error["error"]["message"]


def test_a_wrong_key_or_model_in_anthropics_shape(server, client):
    denied = httpx.post(server.url + "/v1/messages", headers={"x-api-key": "wrong"},
                        json={"max_tokens": 5, "messages": ASK})
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-opus-4", max_tokens=5, messages=ASK)
    assert "'tiny'" in missing.value.body["error"]["message"]
