"""Start `kvflow serve` and llama.cpp's `llama-server` on loopback ports and wait for them,
for the benchmark scripts beside this file (clients.py, startup.py). Standard library and
httpx only: clients.py runs in a virtual environment of client libraries without torch."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
# The name both servers answer to, so that every client asks for the same model.
MODEL_NAME = "smollm2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_kvflow_python() -> Path:
    """The checkout's own virtual environment (`make install`), else this interpreter."""
    venv = REPO / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def kvflow_command(python: Path, model: Path | None, port: int, *flags: str) -> list[str]:
    """`kvflow serve` of this checkout (run with cwd=REPO); no model: the demo model."""
    command = [str(python), "-m", "kvflow.cli", "serve"]
    command += [str(model)] if model else []
    return command + ["--host", "127.0.0.1", "--port", str(port), *flags]


def llama_server_command(binary: Path, gguf: Path, port: int, *flags: str) -> list[str]:
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), *flags]


def find_llama_server(kvflow_python: Path, jobs: int = 2) -> Path:
    """llama-server as kvflow's benchmarks build it (kvflow.bench.llama_cpp: from the
    llama-cpp-python sdist, under the kvflow cache), building it on first use."""
    script = ("import sys; from kvflow.bench.llama_cpp import ensure_llama_server; "
              f"print(ensure_llama_server(jobs={jobs}))")
    out = subprocess.run([str(kvflow_python), "-c", script], cwd=REPO, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


@dataclass
class Running:
    """A launched server: its process, root URL, log, and seconds from launch to the first
    200 on /health."""
    process: subprocess.Popen
    url: str
    log: Path
    ready_s: float

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + "/health", timeout=5).status_code == 200
    return False


def wait_healthy(process: subprocess.Popen, url: str, log: Path, started: float,
                 timeout: float) -> float:
    """Seconds from `started` (time.monotonic) to the first 200 on /health."""
    while True:
        if _healthy(url):
            return time.monotonic() - started
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"no 200 on {url}/health within {timeout:.0f} s; see {log}")
        time.sleep(0.1)  # the resolution of the start-up times; each poll is a request


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running(command: list[str], port: int, log: Path, env: dict[str, str] | None = None,
            timeout: float = 900.0) -> Iterator[Running]:
    """The server of `command` (listening on `port`), healthy, for the block; stopped after."""
    log.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as log_file:
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})},
                                   stdout=log_file, stderr=subprocess.STDOUT)
        try:
            ready = wait_healthy(process, url, log, started, timeout)
            yield Running(process, url, log, ready)
        finally:
            stop(process)
