"""ASGI middleware that bounds what one client can make the server hold."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvflow.json_depth import MAX_JSON_DEPTH, too_deep
from kvflow.server.errors import error_response

logger = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """Refuses request bodies over max_bytes with a 413, before reading them when the
    Content-Length says so, and as soon as the count passes the limit otherwise (chunked
    uploads), so that no route parses or tokenizes an oversized body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return (f"the request body exceeds the server's limit of {self.max_bytes} bytes "
                "(--max-request-body-bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = error_response(413, self._message(), headers={"Connection": "close"},
                                      path=scope["path"])
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes HTTPExceptions from body reading through to the app's
                    # handler, which answers in the OpenAI error shape.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)


class JsonDepthMiddleware:
    """Refuses a request body whose arrays and objects nest past MAX_JSON_DEPTH with a 400
    naming its top-level field, before any route parses it: json.loads, the request models
    and the walkers over them recurse once per level. Runs inside the body-size and timeout
    middleware, whose 413 and 408 it answers as they are raised while it reads."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left before its body was whole: nobody to answer
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except HTTPException as exc:
            await error_response(exc.status_code, str(exc.detail),
                                 path=scope["path"])(scope, receive, send)
            return
        body = b"".join(chunks)
        # The scan releases the GIL for most of its work: other requests go on meanwhile.
        excess = await asyncio.to_thread(too_deep, body)
        if excess is not None:
            depth, field = excess
            response = error_response(400, f"{field or 'the request body'} nests {depth:,} "
                                           "levels of arrays and objects; the limit is "
                                           f"{MAX_JSON_DEPTH}", field, path=scope["path"])
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # what follows the body: the client's disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class _ClientStalled(Exception):
    """The client read nothing of the response for the write timeout."""


class ClientTimeoutMiddleware:
    """Bounds how long one slow client holds the server: its body must arrive within
    body_timeout of its headers (else 408), and each part of a response must be taken by the
    client within write_timeout (else the response ends, which aborts its request: a client
    that stops reading a stream would otherwise hold a sequence in the batch until
    max_tokens)."""

    def __init__(self, app: ASGIApp, body_timeout: float, write_timeout: float) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.body_timeout
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # what follows the body is the client's disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within "
                                         f"{self.body_timeout:g} s (--body-timeout)") from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def timed_send(message: Message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
                return
            try:
                await asyncio.wait_for(send(message), self.write_timeout)
            except TimeoutError:
                raise _ClientStalled from None

        try:
            await self.app(scope, timed_receive, timed_send)
        except _ClientStalled:
            logger.warning("a client read nothing for %g s (--write-timeout); its response "
                           "was ended and its request aborted", self.write_timeout)


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer KEY` (the scheme in any case, as RFC 7235 says) or
    `x-api-key: KEY` (Anthropic's clients send that) on every path but the open ones. The
    key is compared in constant time."""

    def __init__(self, app: ASGIApp, api_keys: list[str], open_paths: tuple[str, ...]) -> None:
        self.app = app
        self.expected = [key.encode() for key in api_keys]
        self.open_paths = open_paths

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        bearer = token.strip() if scheme.lower() == b"bearer" else None
        given = [key for key in (bearer, headers.get(b"x-api-key")) if key is not None]
        # Every key is compared, so the time taken says nothing about which one was close.
        matches = [hmac.compare_digest(key, expected) for key in given
                   for expected in self.expected]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths \
                and not self._authorized(scope):
            response = error_response(401, "missing or wrong API key (send Authorization: "
                                      "Bearer KEY, or x-api-key: KEY)",
                                      headers={"WWW-Authenticate": "Bearer"},
                                      path=scope["path"])
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
