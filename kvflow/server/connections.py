"""Bounds on connections, which uvicorn leaves open: how many a server holds, and how long
a client may take to send a request's headers.

Without them, connections that send half a request line and stop are held for ever: a
client that opens thousands exhausts the process's file descriptors and nothing answers,
/health included. uvicorn's keep-alive timer only runs between requests and stops at the
first byte, so a client that trickles a header never meets it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import Counter

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvflow.server.errors import error_body

logger = logging.getLogger(__name__)

# Descriptors left to the process itself: model files, logs, pipes, tokenizer threads.
RESERVED_DESCRIPTORS = 256
MAX_DEFAULT_CONNECTIONS = 4096


def raise_descriptor_limit() -> int:
    """Raises this process's soft limit on open files to its hard limit (as vLLM does), and
    returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    except (ValueError, OSError):
        return soft


def default_max_connections(descriptor_limit: int) -> int:
    return max(16, min(MAX_DEFAULT_CONNECTIONS, descriptor_limit - RESERVED_DESCRIPTORS))


def default_max_per_client(max_connections: int) -> int:
    """Half of all: one address (a client, or everyone behind one proxy) cannot take every
    slot, and a benchmark from one machine still gets thousands."""
    return max(1, max_connections // 2)


def _raw_error(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP response, for answers given below the app (the same body as its own)."""
    body = json.dumps(error_body(status, message)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def guarded_protocol(max_connections: int, max_per_client: int,
                     header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with caps on open connections (in all, and from one client
    address, so that one client cannot take every slot) and a deadline for headers."""
    refusal = _raw_error(503, "Service Unavailable", f"the server holds its limit of "
                         f"{max_connections} connections (--max-connections); retry later")
    client_refusal = _raw_error(503, "Service Unavailable", f"this address holds its limit "
                                f"of {max_per_client} connections "
                                "(--max-connections-per-client); retry later")
    too_slow = _raw_error(408, "Request Timeout", f"the request's headers did not arrive "
                          f"within {header_timeout:g} s (--header-timeout)")

    # Refused connections stay in uvicorn's own set until their close completes; this one
    # holds only those let in.
    admitted: set[H11Protocol] = set()
    per_client: Counter[str] = Counter()

    class GuardedH11Protocol(H11Protocol):
        _header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else ""
            if len(admitted) >= max_connections:
                self._refuse(refusal, "the server holds its limit of %d (--max-connections)",
                             max_connections)
                return
            if per_client[host] >= max_per_client:
                self._refuse(client_refusal, "an address holds its limit of %d "
                             "(--max-connections-per-client)", max_per_client)
                return
            admitted.add(self)
            per_client[host] += 1
            self._arm_header_deadline()

        def _refuse(self, answer: bytes, reason: str, limit: int) -> None:
            # Closed at once, so the descriptor is free again before the next accept.
            logger.warning("refused a connection: " + reason, limit)
            self.transport.write(answer)
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self in admitted:
                admitted.discard(self)
                host = self.client[0] if self.client else ""
                per_client[host] -= 1
                if not per_client[host]:
                    del per_client[host]
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm_header_deadline()  # a whole request line and headers are in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                # The next request's headers are due in the same time; uvicorn's keep-alive
                # timer stops at their first byte.
                self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            self._header_deadline = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_late(self) -> None:
            self._header_deadline = None
            if self.transport.is_closing() or (self.cycle is not None
                                               and not self.cycle.response_complete):
                return
            # Nothing of the next request yet is an idle connection: close it quietly. Part
            # of its headers is a client that is too slow: tell it why.
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self.transport.write(too_slow)
            self.transport.close()

    return GuardedH11Protocol
