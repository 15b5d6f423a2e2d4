"""kvflow's own log handler, so that start-up facts (how many tokens the KV cache holds)
reach users who configured no logging. Set KVFLOW_CONFIGURE_LOGGING=0 to leave logging
entirely to the application."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

ROOT = "kvflow"


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not at import time."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def configure_logging(level: str | int | None = None) -> None:
    logger = logging.getLogger(ROOT)
    if os.environ.get("KVFLOW_CONFIGURE_LOGGING", "1") == "0":
        return
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level or os.environ.get("KVFLOW_LOG_LEVEL", "INFO").upper())


class RepeatFilter(logging.Filter):
    """Lets one of each identical warning or error through per window, and says how many it
    held back when the next one passes: a fault that repeats thousands of times a second
    (a client flooding connections, say) must not fill the disk with the same traceback."""

    def __init__(self, window_s: float = 10.0, max_keys: int = 1024) -> None:
        super().__init__()
        self.window_s = window_s
        self.max_keys = max_keys
        self._seen: dict[tuple, list] = {}  # key -> [start of its window, held back]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, record.getMessage()[:1000], error)
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window_s:
                entry[1] += 1
                return False
            held_back = entry[1] if entry is not None else 0
            if entry is None and len(self._seen) >= self.max_keys:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
            self._seen[key] = [now, 0]
        if held_back:
            record.msg = f"{record.msg} [{held_back} identical messages held back]"
        return True
