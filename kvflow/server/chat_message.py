"""A chat choice's text as an OpenAI message: the reasoning split off (--reasoning-parser),
then tool calls parsed out of the answer; whole for a response or as deltas for a stream. Deltas are differences between successive parses, which only
grow (tool_parsers/base.py), so a stream reassembles to the response exactly."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvflow.server.reasoning_parsers import ReasoningParser
from kvflow.server.tool_calls import tool_call_id
from kvflow.server.tool_parsers.base import ParsedCall, ToolParser


@dataclass(frozen=True)
class ParsedMessage:
    content: str | None
    tool_calls: tuple[ParsedCall, ...] = ()
    reasoning_content: str | None = None


@dataclass(frozen=True)
class MessageParser:
    tools: ToolParser | None = None  # None: the answer is the content
    parallel_tool_calls: bool = True  # False: only the first call counts
    reasoning: ReasoningParser | None = None  # None: all of the text is the answer

    def parse(self, text: str, final: bool) -> ParsedMessage:
        if self.reasoning is None:
            reasoning, answer = None, text
        else:
            reasoning, answer = self.reasoning.split(text, final)
            reasoning = reasoning or None  # split from reasoning, empty is none
        content, calls = answer, ()
        if self.tools is not None:
            parsed = self.tools.parse(answer or "", final)
            content, calls = parsed.content, parsed.calls
        if self.reasoning is not None:
            content = content or None
        return ParsedMessage(content, calls if self.parallel_tool_calls else calls[:1],
                             reasoning)

    def message_body(self, message: ParsedMessage, role: str) -> dict[str, Any]:
        body: dict[str, Any] = {"role": role, "content": message.content}
        if self.reasoning is not None:
            body["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            body["tool_calls"] = [_call_body(tool_call_id(), call)
                                  for call in message.tool_calls]
        return body

    @staticmethod
    def finish_reason(message: ParsedMessage, finish_reason: str | None) -> str | None:
        """"tool_calls" for an output that ended with calls; a cut one keeps "length"."""
        return "tool_calls" if message.tool_calls and finish_reason == "stop" else finish_reason


@dataclass
class MessageDeltas:
    """What one streamed choice has sent of its message."""

    sent_content: int = 0
    sent_reasoning: int = 0
    call_ids: list[str] = field(default_factory=list)
    sent_arguments: list[int] = field(default_factory=list)

    def next(self, message: ParsedMessage) -> dict[str, Any]:
        """The delta from what was sent to `message`."""
        delta: dict[str, Any] = {}
        reasoning = message.reasoning_content or ""
        if len(reasoning) > self.sent_reasoning:
            delta["reasoning_content"] = reasoning[self.sent_reasoning:]
            self.sent_reasoning = len(reasoning)
        content = message.content or ""
        if len(content) > self.sent_content:
            delta["content"] = content[self.sent_content:]
            self.sent_content = len(content)
        calls = []
        for index, call in enumerate(message.tool_calls):
            if index == len(self.call_ids):
                # OpenAI's first delta of a call: its id, type and name (and the arguments
                # so far); later ones add to the arguments.
                self.call_ids.append(tool_call_id())
                self.sent_arguments.append(len(call.arguments))
                calls.append({"index": index, **_call_body(self.call_ids[index], call)})
            elif len(call.arguments) > self.sent_arguments[index]:
                calls.append({"index": index, "function": {
                    "arguments": call.arguments[self.sent_arguments[index]:]}})
                self.sent_arguments[index] = len(call.arguments)
        if calls:
            delta["tool_calls"] = calls
        return delta


def _call_body(call_id: str, call: ParsedCall) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}
