"""Chat templates rendered under a time, output and memory budget.

A template comes from the model's files (a GGUF file's metadata, a checkpoint's
tokenizer_config.json) and is Jinja code: transformers renders it in Jinja's sandbox,
which stops it reaching Python's internals but not looping for ever or writing gigabytes.
A thread running such a render can be neither stopped nor bounded, so renders run in
worker processes (render_worker.py), one per caller at a time: a render that runs past
its time is answered with an error and its worker killed, and a worker's address space
is capped. Workers start when first needed and are kept for the next render.
"""
from __future__ import annotations

import select
import subprocess
import sys
import threading
import weakref
from typing import Any

from kvflow.tokenizer import render_worker
from kvflow.tokenizer.render_worker import FAILED, OK, READY, receive, send

RENDER_TIMEOUT_S = 5.0
MAX_RENDER_CHARS = 1 << 24  # 16M characters: four times the server's largest request body
# Starting a worker imports transformers: about a second, more on a loaded machine.
START_TIMEOUT_S = 120.0


class RenderError(ValueError):
    """The template failed on its input (`over_budget` False: it raised), or ran out of
    time, output or memory (`over_budget` True)."""

    def __init__(self, message: str, over_budget: bool) -> None:
        super().__init__(message)
        self.over_budget = over_budget


class _Worker:
    def __init__(self) -> None:
        """Raises RuntimeError if the worker does not start: kvflow's failure, not the
        template's (a 500, or a failed load)."""
        # -P: the script's folder (kvflow/tokenizer) must not shadow modules on the path.
        self.process = subprocess.Popen([sys.executable, "-P", render_worker.__file__],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            if self._reply(START_TIMEOUT_S) != READY:
                raise EOFError
        except (EOFError, TimeoutError):
            self.kill()
            raise RuntimeError(f"the chat template render process did not start (exit "
                               f"code {self.process.returncode}; its error is in the "
                               "log)") from None

    def call(self, job: dict[str, Any], timeout_s: float) -> tuple[str, str]:
        """Raises TimeoutError, EOFError or OSError when the worker did not answer."""
        send(self.process.stdin, job)
        return self._reply(timeout_s)

    def _reply(self, timeout_s: float) -> Any:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError
        return receive(self.process.stdout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


class TemplateRenderer:
    """Thread-safe: each caller takes an idle worker, or starts one."""

    def __init__(self, timeout_s: float = RENDER_TIMEOUT_S,
                 max_chars: int = MAX_RENDER_CHARS) -> None:
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._starting: threading.Thread | None = None
        # Workers would end on their own when this process does (their pipe closes); an
        # engine dropped before then takes its workers with it.
        self._finalizer = weakref.finalize(self, _kill_all, self._idle)

    def prestart(self) -> None:
        """Start a worker now, on a thread of its own: the server does so before it loads
        the model, so that its probe render does not wait for a worker's imports."""
        def start() -> None:
            try:
                worker = _Worker()
            except RuntimeError:
                return  # the first render starts one of its own, and reports why it cannot
            with self._lock:
                self._idle.append(worker)

        self._starting = threading.Thread(target=start, name="kvflow-render-start",
                                          daemon=True)
        self._starting.start()

    def render(self, **job: Any) -> str:
        """render_jinja_template's keywords, and `conversation` (one). Raises RenderError
        for the template's failures."""
        starting = self._starting
        if starting is not None:  # the worker being started is as near as any
            starting.join()
            self._starting = None
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        worker = worker or _Worker()
        try:
            status, result = worker.call({**job, "max_chars": self.max_chars}, self.timeout_s)
        except (TimeoutError, EOFError, OSError) as exc:
            worker.kill()
            raise RenderError(f"it did not finish within {self.timeout_s:g} s"
                              if isinstance(exc, TimeoutError) else
                              f"its render process ended (exit code {worker.process.returncode})",
                              over_budget=True) from None
        with self._lock:
            self._idle.append(worker)
        if status == OK:
            return result
        raise RenderError(result, over_budget=status != FAILED)

    def close(self) -> None:
        self._finalizer()


def _kill_all(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().kill()
