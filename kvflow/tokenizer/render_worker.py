"""The chat-template render worker: a process of its own, started by
`render_process.TemplateRenderer`, that renders templates with transformers' sandboxed
Jinja environment and answers each with the text or the template's error.

A chat template is code from a model file. Here it may loop, recurse or allocate without
holding a server thread: the parent kills this process when a render's time is up, and
its address space is capped, so a template that writes gigabytes fails with MemoryError.
It runs as a script (`python -P`) and imports transformers and jinja only, never kvflow's
engine (this module imports nothing of kvflow's, so the parent can share its framing).
"""
from __future__ import annotations

import os
import pickle
import resource
import signal
import struct
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

_HEADER = struct.Struct("<Q")
READY = "ready"
# Address space a render may add to the worker's own (about 200 MB with transformers).
MEMORY_HEADROOM = 1 << 30
# Reply statuses: the text; the template raised; it went past a budget.
OK, FAILED, OVER_BUDGET = "ok", "failed", "over-budget"


def send(stream: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def receive(stream: BinaryIO) -> Any:
    """The next message; EOFError when the other side has gone."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def _cap_memory() -> None:
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS,
                       (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _render(render: Callable[..., Any], job: dict[str, Any]) -> tuple[str, str]:
    """(status, text or message) for one job: render_jinja_template's keywords, plus the
    conversation and the most characters the text may have."""
    max_chars = job.pop("max_chars")
    try:
        (text,), _ = render(conversations=[job.pop("conversation")], **job)
    except MemoryError:
        return OVER_BUDGET, f"it needed more than {MEMORY_HEADROOM >> 20} MiB of memory"
    except Exception as exc:  # noqa: BLE001 - a template's errors are the caller's to report
        return FAILED, str(exc)
    if len(text) > max_chars:
        return OVER_BUDGET, f"it wrote {len(text):,} characters, more than {max_chars:,}"
    return OK, text


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    if sys.platform == "linux":
        _cap_memory()
    send(replies, READY)
    while True:
        try:
            job = receive(requests)
        except EOFError:  # the parent has closed the pipe, or gone
            return
        send(replies, _render(render_jinja_template, job))


if __name__ == "__main__":
    # Ctrl-C in a terminal reaches the whole process group; the parent ends this worker
    # by closing its pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print goes to stderr, not into the replies
    serve(sys.stdin.buffer, replies)
