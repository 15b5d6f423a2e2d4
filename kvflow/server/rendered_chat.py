"""Requests of the other generation APIs (OpenAI's Responses, Anthropic's Messages) are
rendered into chat completion requests, so that one path prepares them all: the chat
request is validated and prepared as if a client had sent it, and its errors name the
field the client did send."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import ValidationError

from kvflow.sampling_params import ParameterError
from kvflow.server.protocol import ChatCompletionRequest
from kvflow.server.serving import Job, OpenAIServing


@contextmanager
def named_as_sent(names: dict[str, str]) -> Iterator[None]:
    """Errors about a chat field name the client's field instead (`names`: chat field to
    the client's; fields missing from it have the same name in both)."""
    try:
        yield
    except ValidationError as exc:
        first = exc.errors()[0]
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, ParameterError):
            raise ParameterError(names.get(cause.param, cause.param), str(cause)) from None
        location = [str(part) for part in first["loc"]]
        raise ParameterError(names.get(location[0], location[0]),
                             f"{'.'.join(location)}: {first['msg']}") from None
    except ParameterError as exc:
        raise ParameterError(names.get(exc.param, exc.param), str(exc)) from None


def chat_request(body: dict[str, Any], names: dict[str, str]) -> ChatCompletionRequest:
    with named_as_sent(names):
        return ChatCompletionRequest.model_validate(body)


def prepare_rendered(serving: OpenAIServing, body: dict[str, Any], model: str,
                     names: dict[str, str]) -> Job:
    """The job of a chat request rendered from another API's request."""
    request = chat_request(body, names)
    with named_as_sent(names):
        return serving.prepare_chat(request, model)
