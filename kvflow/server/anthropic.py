"""POST /v1/messages (Anthropic's Messages API, as llama.cpp serves it) on the chat path:
the request is rendered into a chat completion request (anthropic_protocol.py) and prepared
by OpenAIServing; its output comes back as content blocks (thinking, text, tool_use), whole
or as Anthropic's stream events."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvflow import json_depth
from kvflow.outputs import RequestOutput
from kvflow.server.anthropic_protocol import MESSAGES_FIELDS, MessagesInput, MessagesRequest
from kvflow.server.errors import anthropic_error_body
from kvflow.server.output_items import ItemEvent, OutputItem, OutputItems
from kvflow.server.rendered_chat import chat_request, named_as_sent, prepare_rendered
from kvflow.server.serving import Job, OpenAIServing, sse, stream_error


@dataclass(frozen=True)
class PendingMessage:
    job: Job
    cached_tokens: bool  # whether usage may say how much of the prompt was cached

    @property
    def id(self) -> str:
        return f"msg_{self.job.id}"

    def body(self, content: list[dict[str, Any]], stop: tuple[str | None, str | None],
             usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.job.model,
                "content": content, "stop_reason": stop[0], "stop_sequence": stop[1],
                "usage": usage}

    def usage(self, output: RequestOutput | None) -> dict[str, Any]:
        """Before the output (None): the prompt's tokens and none generated."""
        usage = {"input_tokens": len(self.job.prepared[0].parent.prompt_token_ids),
                 "output_tokens": 0 if output is None else len(output.outputs[0].token_ids)}
        if self.cached_tokens and output is not None:
            usage["cache_read_input_tokens"] = output.num_cached_tokens or 0
        return usage


def stop_reason(finish_reason: str | None,
                engine_stop_reason: int | str | None) -> tuple[str | None, str | None]:
    """Anthropic's stop_reason and stop_sequence for a chat finish_reason and the engine's
    stop_reason (the stop string matched, or the stop token)."""
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(engine_stop_reason, str):
        return "stop_sequence", engine_stop_reason
    return "end_turn", None


def block(item: OutputItem, whole: bool = True) -> dict[str, Any]:
    """A content block; not `whole`: as it opens, empty."""
    text = item.text if whole else ""
    if item.kind == "reasoning":
        return {"type": "thinking", "thinking": text, "signature": ""}
    if item.kind == "text":
        return {"type": "text", "text": text}
    return {"type": "tool_use", "id": item.call_id, "name": item.name,
            "input": _arguments(item.text) if whole else {}}


def _arguments(text: str) -> dict[str, Any]:
    """A call's input; arguments cut short by max_tokens, or not an object, are none."""
    try:
        arguments = json_depth.loads(text)
    except ValueError:  # not JSON, or nested too deep to parse
        return {}
    return arguments if isinstance(arguments, dict) else {}


class AnthropicMessages:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    def prepare(self, request: MessagesRequest, model: str) -> PendingMessage:
        job = prepare_rendered(self.serving, request.chat_body(), model, MESSAGES_FIELDS)
        return PendingMessage(job, self.serving.enable_prompt_tokens_details)

    def count_tokens(self, request: MessagesInput) -> dict[str, int]:
        chat = chat_request(request.chat_body(), MESSAGES_FIELDS)
        with named_as_sent(MESSAGES_FIELDS):
            _, tokens = self.serving.encode_chat(chat.messages, chat.chat_options())
        return {"input_tokens": len(tokens)}

    async def full(self, pending: PendingMessage) -> dict[str, Any]:
        output, = await self.serving.final_outputs(pending.job)
        completion = output.outputs[0]
        message = pending.job.parser.parse(completion.text, final=True)
        stop = stop_reason(pending.job.parser.finish_reason(message, completion.finish_reason),
                           completion.stop_reason)
        return pending.body([block(item) for item in OutputItems.of(message)], stop,
                            pending.usage(output))

    async def stream(self, pending: PendingMessage) -> AsyncIterator[str]:
        yield _event("message_start", message=pending.body([], (None, None),
                                                           pending.usage(None)))
        items = OutputItems()
        stop: tuple[str | None, str | None] = (None, None)
        output: RequestOutput | None = None
        try:
            async for step in self.serving.stream_steps(pending.job):
                if step is None:
                    yield _event("ping")  # Anthropic's keep-alive
                    continue
                for choice in step.choices:
                    if choice["finish_reason"] is not None:
                        stop = stop_reason(choice["finish_reason"], choice["stop_reason"])
                    for event in items.add(choice["delta"]):
                        yield _block_event(event)
                output = step.output
            for event in items.finish():
                yield _block_event(event)
            yield _event("message_delta", delta={"stop_reason": stop[0], "stop_sequence": stop[1]},
                         usage=pending.usage(output))
            yield _event("message_stop")
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            yield sse("error", anthropic_error_body(*stream_error(exc)))


def _event(kind: str, **fields: Any) -> str:
    return sse(kind, {"type": kind, **fields})


def _block_event(event: ItemEvent) -> str:
    index = event.item.index
    if event.kind == "start":
        return _event("content_block_start", index=index,
                      content_block=block(event.item, whole=False))
    if event.kind == "stop":
        return _event("content_block_stop", index=index)
    kind = event.item.kind
    delta = ({"type": "thinking_delta", "thinking": event.delta} if kind == "reasoning" else
             {"type": "text_delta", "text": event.delta} if kind == "text" else
             {"type": "input_json_delta", "partial_json": event.delta})
    return _event("content_block_delta", index=index, delta=delta)
