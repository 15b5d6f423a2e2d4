"""A chat output as the Responses and Messages APIs give it: a list of items (reasoning,
text, tool calls) built from the chat deltas (chat_message.MessageDeltas), so that a stream
and a whole response are made the same way. Each item opens, grows and closes before the
next opens, as both APIs stream them: the parsers' rule (tool_parsers/base.py) that a
partial parse is a prefix of every later one means that only the newest item grows."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from kvflow.server.chat_message import MessageDeltas, ParsedMessage

ItemKind = Literal["reasoning", "text", "call"]


@dataclass
class OutputItem:
    kind: ItemKind
    index: int  # its place in the output
    text: str = ""  # the reasoning, the text, or a call's arguments (JSON text)
    call_id: str | None = None  # a call's
    name: str | None = None  # a call's function
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class ItemEvent:
    kind: Literal["start", "delta", "stop"]
    item: OutputItem
    delta: str = ""  # what a delta adds to the item's text


class OutputItems:
    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self._open: OutputItem | None = None
        self._calls: dict[int, OutputItem] = {}  # by the chat delta's tool-call index

    @classmethod
    def of(cls, message: ParsedMessage) -> list[OutputItem]:
        """A whole message's items."""
        items = cls()
        items.add(MessageDeltas().next(message))
        items.finish()
        return items.items

    def add(self, delta: dict[str, Any]) -> list[ItemEvent]:
        """The events of one chat delta."""
        events: list[ItemEvent] = []
        for kind, key in (("reasoning", "reasoning_content"), ("text", "content")):
            if delta.get(key):
                if self._open is None or self._open.kind != kind:
                    self._start(events, kind)
                events.append(self._grow(self._open, delta[key]))  # type: ignore[arg-type]
        for call in delta.get("tool_calls", ()):
            if "id" in call:  # a call's first delta
                self._calls[call["index"]] = self._start(
                    events, "call", call_id=call["id"], name=call["function"]["name"])
            if call["function"]["arguments"]:
                events.append(self._grow(self._calls[call["index"]],
                                         call["function"]["arguments"]))
        return events

    def finish(self) -> list[ItemEvent]:
        """Closes the last item. An output with none gets an empty text: clients read the
        answer from the first text item."""
        events: list[ItemEvent] = []
        if not self.items:
            self._start(events, "text")
        events.append(ItemEvent("stop", self._open))  # type: ignore[arg-type]
        self._open = None
        return events

    def _start(self, events: list[ItemEvent], kind: ItemKind, **call: Any) -> OutputItem:
        if self._open is not None:
            events.append(ItemEvent("stop", self._open))
        self._open = OutputItem(kind, len(self.items), **call)
        self.items.append(self._open)
        events.append(ItemEvent("start", self._open))
        return self._open

    @staticmethod
    def _grow(item: OutputItem, text: str) -> ItemEvent:
        item.text += text
        return ItemEvent("delta", item, text)
