"""Anthropic's Messages API request, as llama.cpp takes it, and its rendering into a chat
completion request: `system` becomes a system message, content blocks become chat content,
tool calls (`tool_use`) and tool messages (`tool_result`), `input_schema` tools chat tools."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from kvflow.sampling_params import ParameterError
from kvflow.server.protocol import MAX_MESSAGES, MAX_TOOLS, OpenAIModel, SamplingFields

# Chat field -> the Messages field it is rendered from, for errors.
MESSAGES_FIELDS = {"stop": "stop_sequences"}


class TextBlock(OpenAIModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(OpenAIModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(OpenAIModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False  # the template has no place for it: the result's text says it


class ThinkingBlock(OpenAIModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock,
                         Field(discriminator="type")]


class AnthropicMessage(OpenAIModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class AnthropicTool(OpenAIModel):
    type: str | None = None  # "custom" or none; Anthropic's server tools are refused
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class AnthropicToolChoice(OpenAIModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class MessagesInput(SamplingFields):
    """What renders into a prompt: POST /v1/messages/count_tokens takes this much."""

    LIST_CAPS = {"messages": MAX_MESSAGES, "tools": MAX_TOOLS}
    model: str | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None

    def chat_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {**self.sampling_fields_set(), "messages": self._chat_messages()}
        if self.tools:
            body["tools"] = [_chat_tool(index, tool) for index, tool in enumerate(self.tools)]
        choice = self.tool_choice
        if choice is not None:
            body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
            if choice.type == "tool":
                if choice.name is None:
                    raise ParameterError("tool_choice", 'tool_choice of type "tool" needs a name')
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                body["tool_choice"] = {"any": "required"}.get(choice.type, choice.type)
        return body

    def _chat_messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            messages.append({"role": "system", "content": _text_content(self.system)})
        for position, message in enumerate(self.messages):
            if isinstance(message.content, str):
                messages.append({"role": message.role, "content": message.content})
            elif message.role == "user":
                messages.extend(_user_turn(message.content, position))
            else:
                messages.append(_assistant_turn(message.content, position))
        return messages


class MessagesRequest(MessagesInput):
    max_tokens: int  # required, as in Anthropic's API
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None

    def chat_body(self) -> dict[str, Any]:
        body = {**super().chat_body(), "max_tokens": self.max_tokens}
        if self.stop_sequences is not None:
            if self.stop is not None:
                raise ParameterError("stop_sequences", "give stop_sequences or stop, not both")
            body["stop"] = self.stop_sequences
        return body


def _chat_tool(index: int, tool: AnthropicTool) -> dict[str, Any]:
    if tool.type not in (None, "custom"):
        raise ParameterError("tools", f"tools[{index}] is Anthropic's {tool.type!r} tool: "
                             "kvflow serves custom tools (name, description, input_schema)")
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _text_content(content: str | list[TextBlock]) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": block.text} for block in content]


def _user_turn(blocks: list[Any], position: int) -> list[dict[str, Any]]:
    """Tool results (which Anthropic puts first) as tool messages, then the text."""
    turn: list[dict[str, Any]] = []
    texts: list[TextBlock] = []
    for block in blocks:
        if isinstance(block, ToolResultBlock):
            turn.append({"role": "tool", "tool_call_id": block.tool_use_id,
                         "content": _text_content(block.content)})
        elif isinstance(block, TextBlock):
            texts.append(block)
        else:
            raise ParameterError("messages", f"messages[{position}]: a user message cannot "
                                 f"hold a {block.type} block")
    if texts or not turn:
        turn.append({"role": "user", "content": _text_content(texts)})
    return turn


def _assistant_turn(blocks: list[Any], position: int) -> dict[str, Any]:
    """One assistant message: thinking as reasoning_content, text, tool_use as tool_calls."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    texts = [block for block in blocks if isinstance(block, TextBlock)]
    if texts:
        message["content"] = _text_content(texts)
    thinking = [block.thinking for block in blocks if isinstance(block, ThinkingBlock)]
    if thinking:
        message["reasoning_content"] = "\n".join(thinking)
    calls = [{"id": block.id, "type": "function",
              "function": {"name": block.name, "arguments": json.dumps(block.input)}}
             for block in blocks if isinstance(block, ToolUseBlock)]
    if calls:
        message["tool_calls"] = calls
    if any(isinstance(block, ToolResultBlock) for block in blocks):
        raise ParameterError("messages", f"messages[{position}]: tool_result blocks belong in "
                             "a user message")
    return message
