"""Messages between pipeline stages: plain data and tensors, point to point over a gloo
process group (torch.distributed's send and recv).

A send returns at once (gloo sends from its own threads once the receiver is ready; the
tensors are kept until then), so the first stage starts its next batch while the next
stage works on the one it sent. Each peer a rank hears from gets a thread that waits in gloo's recv and queues
what arrives: gloo's recv cannot be polled and closes the connection when it times out,
so the process group's own timeout is effectively infinite and the deadline (and the
check that the peers are alive) is kept here, where a rank waiting for work has none.
"""
from __future__ import annotations

import pickle
import queue
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kvflow.distributed.comm import LIVENESS_EVERY_S, Liveness, WorkerFailedError, gloo_failure

# tags of a message's parts: its header's length, the header, then each tensor
_LENGTH, _HEADER, _TENSOR = 0, 1, 2


class Pipe:
    def __init__(self, group: dist.ProcessGroupGloo, rank: int, peers: Sequence[int],
                 liveness: Liveness, timeout_s: float) -> None:
        """peers: the ranks this one receives from."""
        self.group = group
        self.rank = rank
        self.liveness = liveness
        self.timeout_s = timeout_s
        self._sending: list[tuple[list[dist.Work], list[torch.Tensor]]] = []
        self._inboxes: dict[int, queue.Queue] = {}
        for peer in peers:
            self._inboxes[peer] = queue.Queue()
            threading.Thread(target=self._receive, args=(peer,), daemon=True,
                             name=f"kvflow-pipe-from-{peer}").start()

    def send(self, dst: int, header: Any, tensors: Sequence[torch.Tensor] = ()) -> None:
        """Queues a message to rank dst; the tensors must not change until it is sent."""
        self.flush()
        tensors = [t.contiguous() for t in tensors]
        data = pickle.dumps((header, [(t.dtype, tuple(t.shape)) for t in tensors]), protocol=5)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        length = torch.tensor([payload.numel()], dtype=torch.int64)
        try:
            works = [self.group.send([length], dst, _LENGTH),
                     self.group.send([payload], dst, _HEADER)]
            works += [self.group.send([t], dst, _TENSOR) for t in tensors]
        except RuntimeError as exc:
            raise self._failure(f"a message to rank {dst}", exc) from exc
        self._sending.append((works, [length, payload, *tensors]))

    def flush(self) -> None:
        """Until the messages sent so far are taken (their buffers free to go). gloo sends
        nothing until the receiver is ready, which its receiving thread is at once unless
        its process hangs: the wait has the timeout."""
        sending, self._sending = self._sending, []
        for works, _ in sending:
            for work in works:
                try:
                    work.wait(timedelta(seconds=self.timeout_s))
                except RuntimeError as exc:
                    raise self._failure("a message", exc) from exc

    def recv(self, src: int, what: str, idle: bool = False) -> tuple[Any, list[torch.Tensor]]:
        """The next message from rank src: (header, tensors). Raises WorkerFailedError when
        a peer has stopped, or when nothing came within the timeout (unless `idle`: waiting
        for work)."""
        inbox = self._inboxes[src]
        start = time.monotonic()
        while True:
            try:
                item = inbox.get(timeout=LIVENESS_EVERY_S)
            except queue.Empty:
                reason = self.liveness()
                if reason is not None:
                    raise WorkerFailedError(f"{what} failed: {reason}") from None
                if not idle and time.monotonic() - start > self.timeout_s:
                    raise WorkerFailedError(f"{what} failed: rank {src} sent nothing within "
                                            f"{self.timeout_s:g} s") from None
                continue
            if isinstance(item, BaseException):
                inbox.put(item)  # every later wait fails alike
                raise self._failure(what, item) from item
            return item

    def _receive(self, src: int) -> None:
        inbox = self._inboxes[src]
        try:
            while True:
                length = torch.empty(1, dtype=torch.int64)
                self.group.recv([length], src, _LENGTH).wait()
                payload = torch.empty(int(length), dtype=torch.uint8)
                self.group.recv([payload], src, _HEADER).wait()
                header, specs = pickle.loads(payload.numpy().tobytes())
                tensors = [torch.empty(shape, dtype=dtype) for dtype, shape in specs]
                for tensor in tensors:
                    self.group.recv([tensor], src, _TENSOR).wait()
                inbox.put((header, tensors))
        except BaseException as exc:  # the peer's connection closed: it stopped
            inbox.put(exc)

    def _failure(self, what: str, exc: BaseException) -> WorkerFailedError:
        return gloo_failure(what, exc, self.liveness, self.timeout_s)
