"""POST /v1/responses on the chat path: the request is rendered into a chat completion
request (responses_protocol.py) and prepared by OpenAIServing; its output comes back as
Responses items, whole or as the Responses API's events."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvflow.outputs import RequestOutput
from kvflow.sampling_params import ParameterError
from kvflow.server.output_items import ItemEvent, OutputItem, OutputItems
from kvflow.server.rendered_chat import prepare_rendered
from kvflow.server.response_store import ResponseStore, StoredResponse
from kvflow.server.responses_protocol import (INPUT_ITEMS, RESPONSES_FIELDS, InputItem,
                                              NamedFunctionChoice, ResponsesRequest)
from kvflow.server.serving import KEEPALIVE, Job, OpenAIServing, sse, stream_error


@dataclass
class PendingResponse:
    """A response being made: what its body repeats of the request, and its conversation
    (earlier responses' items and this request's input) to store with its output."""

    job: Job
    request: ResponsesRequest
    conversation: list[InputItem]
    cached_tokens: bool  # whether usage may say how much of the prompt was cached

    @property
    def id(self) -> str:
        return f"resp_{self.job.id}"

    def body(self, status: str, output: list[dict[str, Any]],
             usage: dict[str, Any] | None = None) -> dict[str, Any]:
        request = self.request
        return {
            "id": self.id, "object": "response", "created_at": self.job.created,
            "status": status, "completed_at": int(time.time()) if status == "completed" else None,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete" else None,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata or {}, "model": self.job.model, "output": output,
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": request.previous_response_id, "reasoning": None,
            "store": request.store, "temperature": request.temperature,
            "text": request.text.model_dump(by_alias=True, exclude_none=True)
            if request.text and request.text.format else {"format": {"type": "text"}},
            "tool_choice": request.tool_choice.model_dump()
            if isinstance(request.tool_choice, NamedFunctionChoice)
            else request.tool_choice or "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or ()],
            "top_p": request.top_p, "truncation": "disabled", "usage": usage,
            "user": request.user}

    def usage(self, output: RequestOutput) -> dict[str, Any]:
        prompt = len(output.prompt_token_ids)
        generated = sum(len(c.token_ids) for c in output.outputs)
        cached = (output.num_cached_tokens or 0) if self.cached_tokens else 0
        # Reasoning tokens are not counted apart: the parser splits text, not tokens.
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + generated}


def response_status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


_ID_PREFIXES = {"call": "fc_", "reasoning": "rs_", "text": "msg_"}


def item_id(item: OutputItem) -> str:
    return _ID_PREFIXES[item.kind] + item.id


def item_body(item: OutputItem, status: str, whole: bool = True) -> dict[str, Any]:
    """An output item as the API writes it; not `whole`: as it opens, its content empty."""
    if item.kind == "call":
        return {"type": "function_call", "id": item_id(item), "call_id": item.call_id,
                "name": item.name, "arguments": item.text if whole else "", "status": status}
    content = [_part(item)] if whole else []
    if item.kind == "reasoning":
        return {"type": "reasoning", "id": item_id(item), "summary": [], "content": content,
                "status": status}
    return {"type": "message", "id": item_id(item), "status": status, "role": "assistant",
            "content": content}


def _part(item: OutputItem, text: str | None = None) -> dict[str, Any]:
    text = item.text if text is None else text
    if item.kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_body(items: list[OutputItem], status: str) -> list[dict[str, Any]]:
    """The items of a finished output: the last one carries the response's status (only it
    can have been cut short)."""
    return [item_body(item, status if item is items[-1] else "completed") for item in items]


class Responses:
    def __init__(self, serving: OpenAIServing, store: ResponseStore) -> None:
        self.serving = serving
        self.store = store

    def prepare(self, request: ResponsesRequest, model: str) -> PendingResponse:
        history: list[InputItem] = []
        if request.previous_response_id is not None:
            previous = self.store.get(request.previous_response_id)
            if previous is None:
                raise ParameterError("previous_response_id",
                                     self.store.missing(request.previous_response_id))
            history = previous.conversation
        conversation = [*history, *request.input_items()]
        job = prepare_rendered(self.serving, request.chat_body(conversation), model,
                               RESPONSES_FIELDS)
        return PendingResponse(job, request, conversation,
                               self.serving.enable_prompt_tokens_details)

    async def full(self, pending: PendingResponse) -> dict[str, Any]:
        output, = await self.serving.final_outputs(pending.job)
        completion = output.outputs[0]
        message = pending.job.parser.parse(completion.text, final=True)
        status = response_status(pending.job.parser.finish_reason(message,
                                                                  completion.finish_reason))
        return self._finished(pending, OutputItems.of(message), status, output)

    async def stream(self, pending: PendingResponse) -> AsyncIterator[str]:
        events = _Events(pending)
        yield events.lifecycle("response.created", "in_progress")
        yield events.lifecycle("response.in_progress", "in_progress")
        items = OutputItems()
        finish_reason: str | None = None
        final: RequestOutput | None = None
        try:
            async for step in self.serving.stream_steps(pending.job):
                if step is None:
                    yield KEEPALIVE
                    continue
                for choice in step.choices:
                    finish_reason = choice["finish_reason"] or finish_reason
                    for event in items.add(choice["delta"]):
                        for text in events.item(event, "completed"):
                            yield text
                final = step.output
            assert final is not None and final.finished  # the steps end with the last output
            status = response_status(finish_reason)
            for event in items.finish():
                for text in events.item(event, status):
                    yield text
            body = self._finished(pending, items.items, status, final)
            yield events.emit(f"response.{status}", response=body)
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            code, message = stream_error(exc)
            body = pending.body("failed", output_body(items.items, "incomplete")
                                if items.items else [])
            body["error"] = {"code": "invalid_prompt" if code == 400 else "server_error",
                             "message": message}
            yield events.emit("response.failed", response=body)

    def _finished(self, pending: PendingResponse, items: list[OutputItem], status: str,
                  output: RequestOutput) -> dict[str, Any]:
        output_items = output_body(items, status)
        body = pending.body(status, output_items, pending.usage(output))
        if pending.request.store:
            self.store.put(pending.id, StoredResponse(
                body, [*pending.conversation, *INPUT_ITEMS.validate_python(output_items)]))
        return body


class _Events:
    """The Responses API's server-sent events of one response, numbered in order."""

    def __init__(self, pending: PendingResponse) -> None:
        self.pending = pending
        self.sequence_number = 0

    def emit(self, kind: str, **fields: Any) -> str:
        text = sse(kind, {"type": kind, "sequence_number": self.sequence_number, **fields})
        self.sequence_number += 1
        return text

    def lifecycle(self, kind: str, status: str) -> str:
        return self.emit(kind, response=self.pending.body(status, []))

    def item(self, event: ItemEvent, status: str) -> list[str]:
        """The events of an item's start, growth or end; `status`: an ending item's."""
        item = event.item
        where = {"item_id": item_id(item), "output_index": item.index}
        part = {**where, "content_index": 0}
        if event.kind == "start":
            added = [self.emit("response.output_item.added",
                               output_index=item.index, item=item_body(item, "in_progress",
                                                                       whole=False))]
            if item.kind != "call":
                added.append(self.emit("response.content_part.added", **part,
                                       part=_part(item, "")))
            return added
        if event.kind == "delta":
            if item.kind == "call":
                return [self.emit("response.function_call_arguments.delta", **where,
                                  delta=event.delta)]
            if item.kind == "reasoning":
                return [self.emit("response.reasoning_text.delta", **part, delta=event.delta)]
            return [self.emit("response.output_text.delta", **part, delta=event.delta,
                              logprobs=[])]
        if item.kind == "call":
            ended = [self.emit("response.function_call_arguments.done", **where,
                               name=item.name, arguments=item.text)]
        elif item.kind == "reasoning":
            ended = [self.emit("response.reasoning_text.done", **part, text=item.text)]
        else:
            ended = [self.emit("response.output_text.done", **part, text=item.text,
                               logprobs=[])]
        if item.kind != "call":
            ended.append(self.emit("response.content_part.done", **part, part=_part(item)))
        return [*ended, self.emit("response.output_item.done", output_index=item.index,
                                  item=item_body(item, status))]
