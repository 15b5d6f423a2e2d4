"""POST /v1/responses (OpenAI's Responses API) and GET /v1/responses/{id}, driven by the
openai client and openai-agents against a real server. The model has random weights: its
text is forced where a test needs to know it (structured_outputs' choice of one string), its
calls by tool_choice."""
from __future__ import annotations

import json
import string
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel
from server_process import hermes_tool_flags, running

ENGINE_FLAGS = ("--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB")
MAX_STORED = 4
WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city",
           "parameters": WEATHER_PARAMETERS}
ASK = "What is the weather in Paris?"


def forced(text: str) -> dict:
    """extra_body that makes the model write exactly `text`."""
    return {"structured_outputs": {"choice": [text]}}


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("qwen3", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server-responses")
    with running(model_dir, *ENGINE_FLAGS, "--served-model-name", "tiny",
                 *hermes_tool_flags(folder), "--max-stored-responses", str(MAX_STORED),
                 log=folder / "serve.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


def _prompt_tokens(server, messages: list[dict]) -> int:
    response = httpx.post(server.url + "/tokenize", json={"messages": messages})
    assert response.status_code == 200, response.text
    return response.json()["count"]


def test_string_input_is_a_user_message_and_usage_counts_it(server, client):
    response = client.responses.create(model="tiny", input="hi", max_output_tokens=4,
                                       extra_body={"ignore_eos": True})
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    usage = response.usage
    assert usage.input_tokens == _prompt_tokens(server, [{"role": "user", "content": "hi"}])
    assert usage.output_tokens == 4
    assert usage.total_tokens == usage.input_tokens + 4
    assert usage.input_tokens_details.cached_tokens == 0  # without --enable-prompt-tokens-details
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.output_text == message.content[0].text


def test_items_and_instructions_render_as_chat_messages(server, client):
    parts = [{"type": "input_text", "text": "What is"}, {"type": "input_text", "text": "it?"}]
    response = client.responses.create(
        model="tiny", instructions="Be brief.", extra_body=forced("Sunny."),
        input=[{"role": "user", "content": parts},
               {"type": "message", "role": "assistant", "content": [
                   {"type": "output_text", "text": "Where?", "annotations": []}]},
               {"role": "user", "content": "Paris."}])
    assert response.status == "completed" and response.output_text == "Sunny."
    assert response.instructions == "Be brief."
    assert response.usage.input_tokens == _prompt_tokens(server, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is\nit?"},
        {"role": "assistant", "content": "Where?"}, {"role": "user", "content": "Paris."}])


def test_a_forced_call_and_its_output_round_trip(client):
    """The function_call_output goes back through previous_response_id and through a full
    item list, which render the same conversation."""
    first = client.responses.create(model="tiny", input=ASK, tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    max_output_tokens=200)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and first.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    chained = client.responses.create(model="tiny", previous_response_id=first.id,
                                      input=[result], tools=[WEATHER],
                                      extra_body=forced("It is sunny."))
    assert chained.output_text == "It is sunny." and chained.previous_response_id == first.id
    listed = client.responses.create(
        model="tiny", tools=[WEATHER], extra_body=forced("It is sunny."),
        input=[{"role": "user", "content": ASK}, *[item.model_dump() for item in first.output],
               result])
    assert listed.output_text == "It is sunny."
    assert listed.usage.input_tokens == chained.usage.input_tokens
    # The same turn as a chat conversation renders to the same prompt.
    chat = client.chat.completions.create(
        model="tiny", max_tokens=1, tool_choice="none", messages=[
            {"role": "user", "content": ASK},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.call_id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}],
        tools=[{"type": "function", "function": {
            key: WEATHER[key] for key in ("name", "description", "parameters")}}])
    assert chat.usage.prompt_tokens == listed.usage.input_tokens


def test_required_and_named_choices_name_a_declared_tool(client):
    response = client.responses.create(model="tiny", input=ASK, tools=[WEATHER],
                                       tool_choice="required", parallel_tool_calls=False,
                                       max_output_tokens=200)
    assert [item.name for item in response.output] == ["get_weather"]


def test_a_named_call_with_the_same_schema_as_text_format(client):
    """instructor's RESPONSES_TOOLS mode names its one tool and sets text.format to the same
    schema: the call is made (it was a 400 saying the two constrain the output)."""
    response = client.responses.create(
        model="tiny", input=ASK, tools=[WEATHER], max_output_tokens=200,
        tool_choice={"type": "function", "name": "get_weather"},
        text={"format": {"type": "json_schema", "name": "get_weather",
                         "schema": WEATHER_PARAMETERS, "strict": True}})
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)


def test_hermes_calls_come_back_as_items_after_the_text(client):
    text = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call>')
    response = client.responses.create(model="tiny", input=ASK, tools=[WEATHER],
                                       extra_body=forced(text))
    message, call = response.output
    assert message.content[0].text == "Checking."
    assert (call.name, json.loads(call.arguments)) == (
        "get_weather", {"city": "Paris", "unit": "celsius"})
    with client.responses.stream(model="tiny", input=ASK, tools=[WEATHER],
                                 extra_body=forced(text)) as stream:
        argument_deltas = [event.delta for event in stream
                           if event.type == "response.function_call_arguments.delta"]
        streamed = stream.get_final_response()
    assert [item.type for item in streamed.output] == ["message", "function_call"]
    assert streamed.output[0].content[0].text == "Checking."
    assert "".join(argument_deltas) == streamed.output[1].arguments == call.arguments


class City(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    unit: Literal["celsius", "fahrenheit"]


def test_text_format_json_schema_validates(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    for seed in range(2):
        response = client.responses.create(
            model="tiny", input="A number?", temperature=1.0, max_output_tokens=40,
            text={"format": {"type": "json_schema", "name": "n", "schema": schema,
                             "strict": True}}, extra_body={"seed": seed})
        assert response.status == "completed"
        jsonschema.validate(json.loads(response.output_text), schema)
        assert response.text.format.type == "json_schema"
    parsed = client.responses.parse(model="tiny", input="Where?", text_format=City,
                                    max_output_tokens=40, extra_body={"seed": 0})
    assert parsed.output_parsed.city in ("Paris", "Rome", "Oslo")
    plain = client.responses.create(model="tiny", input="JSON?", max_output_tokens=60,
                                    text={"format": {"type": "json_object"}},
                                    extra_body={"seed": 1})
    assert plain.status == "completed" and isinstance(json.loads(plain.output_text), dict)


def test_stored_responses_are_retrieved_and_evicted_oldest_first(client):
    made = [client.responses.create(model="tiny", input=f"hi {i}", max_output_tokens=1)
            for i in range(MAX_STORED + 1)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made[0].id)
    for response in made[1:]:
        stored = client.responses.retrieve(response.id)
        assert stored.id == response.id and stored.output_text == response.output_text
    unstored = client.responses.create(model="tiny", input="hi", max_output_tokens=1,
                                       store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="tiny", input="and?", previous_response_id=unstored.id)
    assert refused.value.body["param"] == "previous_response_id"
    assert "--max-stored-responses" in refused.value.body["message"]


def test_a_stream_sends_the_events_in_order(client):
    text = "Hello there, friend."
    with client.responses.stream(model="tiny", input="hi", extra_body=forced(text)) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == text == final.output_text
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert final.status == "completed" and final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == text
    with client.responses.stream(model="tiny", input="hi", max_output_tokens=3,
                                 extra_body={"ignore_eos": True}) as stream:
        last = list(stream)[-1]
    assert last.type == "response.incomplete" and last.response.usage.output_tokens == 3


def test_openai_agents_runs_a_tool_loop(server):
    """An Agent with one function tool, on the Responses API: a forced call, the tool's
    result sent back, then the answer."""
    agents = pytest.importorskip("agents", reason="openai-agents is not installed")
    agents.set_tracing_disabled(True)
    calls = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return "sunny"

    # The random model's answer must end before max_tokens (a cut one is an error to the
    # agent): it stops at the first character the forced call cannot contain.
    call = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]Rome'
    stops = [char for char in string.printable if char not in call]
    model = agents.OpenAIResponsesModel("tiny", openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120))
    agent = agents.Agent(name="weather", instructions="Answer briefly.", tools=[get_weather],
                         model=model, model_settings=agents.ModelSettings(
                             tool_choice="required", parallel_tool_calls=False, max_tokens=64,
                             temperature=0, extra_body={"stop": stops}))
    result = agents.Runner.run_sync(agent, ASK, max_turns=3)
    assert len(calls) == 1
    assert [item.type for item in result.new_items] == [
        "tool_call_item", "tool_call_output_item", "message_output_item"]
    assert isinstance(result.final_output, str)


@pytest.mark.parametrize("body, param", [
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": [5]}, "input"),
    ({"input": [{"type": "web_search_call", "id": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{no"}]},
     "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [{"type": "function", "name": "has space"}]}, "tools"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "previous_response_id": "resp_unknown"}, "previous_response_id"),
    ({"input": "x", "model": "gpt-4o"}, "model"),
])
def test_bad_requests_get_400_naming_the_field(server, body, param):
    response = httpx.post(server.url + "/v1/responses", json=body)
    assert response.status_code == (404 if param == "model" else 400), response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    assert "Error" not in error["message"]  # no exception text
    if body.get("input") == [{"type": "web_search_call", "id": "x"}]:  # the item, not "str"
        assert error["message"].startswith("input.0: Input tag 'web_search_call'")


def test_an_unknown_response_id_is_a_404(server):
    response = httpx.get(server.url + "/v1/responses/resp_unknown")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


@pytest.fixture(scope="module")
def reasoning_server(model_dir, tmp_path_factory):
    with running(model_dir, *ENGINE_FLAGS, "--served-model-name", "tiny",
                 "--reasoning-parser", "deepseek_r1",
                 log=tmp_path_factory.mktemp("reasoning") / "serve.log") as process:
        yield process


def test_reasoning_comes_as_a_reasoning_item(reasoning_server):
    """deepseek_r1: the output starts inside the reasoning, so six tokens that never close
    it are all reasoning."""
    client = openai.OpenAI(base_url=reasoning_server.url + "/v1", api_key="none",
                           max_retries=0, timeout=120)
    request = {"temperature": 0, "max_tokens": 6}
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                   "content": "hi"}],
                                          **request).choices[0].message
    reasoning = chat.model_extra["reasoning_content"]
    assert reasoning and chat.content is None
    response = client.responses.create(model="tiny", input="hi", temperature=0,
                                       max_output_tokens=6)
    (item,) = response.output
    assert item.type == "reasoning" and item.content[0].text == reasoning
    with client.responses.stream(model="tiny", input="hi", temperature=0,
                                 max_output_tokens=6) as stream:
        deltas = [event.delta for event in stream
                  if event.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == reasoning
