"""kvflow's own log handler, so that start-up facts (how many tokens the KV cache holds)
reach users who configured no logging. Set KVFLOW_CONFIGURE_LOGGING=0 to leave logging
entirely to the application."""
from __future__ import annotations

import logging
import os
import sys

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
