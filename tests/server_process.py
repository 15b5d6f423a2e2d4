"""Run a real `kvflow serve` in a subprocess on a free loopback port."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from checkpoints import TOOLS_CHAT_TEMPLATE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path | None, *flags: str, log: Path,
                 env: dict[str, str] | None = None) -> None:
        """`env`: variables set for the server on top of this process's."""
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "kvflow.cli", "serve"]
        command += [str(model)] if model else []
        command += ["--port", str(self.port), *flags]
        self._log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self.log_path = log

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready: {self.log_path.read_text()[-3000:]}")

    def wait_load_failure(self, timeout: float = 120.0) -> httpx.Response:
        """/health's answer once it says the model failed to load."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                response = httpx.get(self.url + "/health", timeout=2)
                if "failed to load" in response.text:
                    return response
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"no failed load reported: {self.log_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM; True if the server shut down gracefully within the timeout. uvicorn
        re-raises the signal after a clean shutdown, so the exit status is -SIGTERM."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return False
        finally:
            self._log.close()
        return code in (0, -signal.SIGTERM) and "Application shutdown complete" in \
            self.log_path.read_text()


@contextmanager
def running(model: Path | None, *flags: str, log: Path) -> Iterator[ServerProcess]:
    """A server, ready, for the block; it must shut down gracefully after it."""
    process = ServerProcess(model, *flags, log=log)
    process.wait_ready()
    yield process
    assert process.stop(), process.log_path.read_text()[-3000:]


def broken_checkpoint(folder: Path) -> Path:
    """A checkpoint of an architecture kvflow does not have (FancyForCausalLM)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["FancyForCausalLM"],
                                                    "model_type": "llama"}))
    return folder


def api_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    """The message of an OpenAI-style error answer, after checking its status (and the
    parameter it names)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def hermes_tool_flags(folder: Path) -> tuple[str, ...]:
    """The flags of a server that lists tools and parses hermes calls (the template written
    into `folder`)."""
    template = folder / "tools.jinja"
    template.write_text(TOOLS_CHAT_TEMPLATE)
    return ("--chat-template", str(template), "--enable-auto-tool-choice",
            "--tool-call-parser", "hermes")
