"""OpenAI's Responses API request, as vLLM and llama.cpp take it, and its rendering into a
chat completion request: items become chat messages, flat function tools chat tools,
`text.format` a response_format, `max_output_tokens` max_tokens."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, TypeAdapter

from kvflow.sampling_params import ParameterError
from kvflow.server.protocol import MAX_MESSAGES, MAX_TOOLS, OpenAIModel, SamplingFields

# Chat field -> the Responses field it is rendered from, for errors.
RESPONSES_FIELDS = {"messages": "input", "response_format": "text",
                    "max_tokens": "max_output_tokens"}


class ContentPart(OpenAIModel):
    type: str  # which types an item takes is checked where it is rendered
    text: str | None = None


class MessageItem(OpenAIModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(OpenAIModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text


class FunctionCallOutputItem(OpenAIModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class ReasoningItem(OpenAIModel):
    type: Literal["reasoning"]
    summary: list[ContentPart] = []
    content: list[ContentPart] | None = None


def _item_type(value: Any) -> Any:
    # A message may leave its type out (OpenAI's "easy input message"); what is neither an
    # object nor an item has no type (None: pydantic's error says so).
    return value.get("type", "message") if isinstance(value, dict) else getattr(
        value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")], Discriminator(_item_type)]
INPUT_ITEMS: TypeAdapter[list[InputItem]] = TypeAdapter(list[InputItem])


class TextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is enforced either way


class TextConfig(OpenAIModel):
    format: TextFormat | None = None


class ResponsesTool(OpenAIModel):
    type: str  # only "function" is served; a 400 names the others
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(OpenAIModel):
    type: Literal["function"]
    name: str


class ResponsesRequest(SamplingFields):
    LIST_CAPS = {"input": MAX_MESSAGES, "tools": MAX_TOOLS}
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: int | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None

    def input_items(self) -> list[InputItem]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return self.input

    def chat_body(self, items: list[InputItem]) -> dict[str, Any]:
        """The chat completion request that asks what this request asks, on the
        conversation `items` (earlier responses' included)."""
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ParameterError("max_output_tokens", "max_output_tokens must be at least 1, "
                                 f"got {self.max_output_tokens}")
        body: dict[str, Any] = {**self.sampling_fields_set(),
                                "messages": chat_messages(items, self.instructions),
                                "parallel_tool_calls": self.parallel_tool_calls,
                                "max_tokens": self.max_output_tokens}
        if self.tools:
            body["tools"] = [_chat_tool(index, tool) for index, tool in enumerate(self.tools)]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.text is not None and self.text.format is not None:
            body["response_format"] = _response_format(self.text.format)
        return body


def _chat_tool(index: int, tool: ResponsesTool) -> dict[str, Any]:
    if tool.type != "function":
        raise ParameterError("tools", f"tools[{index}] is a {tool.type!r} tool: kvflow serves "
                             "function tools only (OpenAI's built-in tools run on its servers)")
    if tool.name is None:
        raise ParameterError("tools", f"tools[{index}] needs a name")
    function = tool.model_dump(include={"name", "description", "parameters", "strict"},
                               exclude_none=True)
    return {"type": "function", "function": function}


def _response_format(text_format: TextFormat) -> dict[str, Any]:
    if text_format.type != "json_schema":
        return {"type": text_format.type}
    if text_format.schema_ is None:
        raise ParameterError("text", "text.format of type json_schema needs a schema")
    schema = {"name": text_format.name or "response", "schema": text_format.schema_}
    if text_format.description is not None:
        schema["description"] = text_format.description
    return {"type": "json_schema", "json_schema": schema}


def chat_messages(items: list[InputItem], instructions: str | None) -> list[dict[str, Any]]:
    """Chat messages for a conversation of items. A reasoning item, an assistant message
    and function calls that follow one another are one assistant turn, as a chat template
    renders it: reasoning_content, content, tool_calls."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    for position, item in enumerate(items):
        last = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        if isinstance(item, ReasoningItem):
            parts = [*item.summary, *(item.content or ())]
            messages.append({"role": "assistant", "content": None, "reasoning_content": "\n".join(
                _texts(parts, ("summary_text", "reasoning_text"), position))})
        elif isinstance(item, MessageItem):
            content = item.content if isinstance(item.content, str) else [
                {"type": "text", "text": text} for text in
                _texts(item.content, ("input_text", "output_text"), position)]
            if item.role == "assistant" and last is not None and last["content"] is None \
                    and "tool_calls" not in last:
                last["content"] = content  # the answer after its reasoning
            else:
                messages.append({"role": item.role, "content": content})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if last is None:
                last = {"role": "assistant", "content": None}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        else:
            output = item.output if isinstance(item.output, str) else "\n".join(
                _texts(item.output, ("input_text", "output_text"), position))
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return messages


def _texts(parts: list[ContentPart], types: tuple[str, ...], position: int) -> list[str]:
    for part in parts:
        if part.type not in types or part.text is None:
            raise ParameterError("input", f"input[{position}] has a {part.type!r} content part: "
                                 f"kvflow takes text only here ({', '.join(types)})")
    return [part.text for part in parts]  # type: ignore[misc]
