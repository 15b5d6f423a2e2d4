"""One client opens many connections that send half a request line and stop (issue 11,
finding 2): how many does the server hold, does it close them, and does /health, asked
from another address, still answer?

    python benchmarks/half_open_connections.py [--connections 6000] [--source DIR]

It starts `kvflow serve` (the demo model) from the kvflow checkout at --source, so that
two checkouts can be compared side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_from_elsewhere(url: str) -> tuple[int | str, float]:
    start = time.monotonic()
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    try:
        with httpx.Client(transport=transport) as other:
            code: int | str = other.get(url + "/health", timeout=15).status_code
    except httpx.HTTPError as exc:
        code = type(exc).__name__
    return code, round(time.monotonic() - start, 2)


def ended(socks: list[socket.socket]) -> int:
    """Connections the server has answered or closed."""
    count = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            sock.recv(1 << 16)
            count += 1
        except BlockingIOError:
            pass
        except OSError:
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=6000)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    port = free_port()
    with open(f"/tmp/half-open-{port}.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "kvflow.cli", "serve", "--port",
                                   str(port), "--device", "cpu"], cwd=args.source, stdout=log,
                                  stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": str(args.source)})
        try:
            print(json.dumps(attack(server, port, args)))
        finally:
            server.terminate()
            server.wait(30)


def attack(server: subprocess.Popen, port: int, args: argparse.Namespace) -> dict:
    url = f"http://127.0.0.1:{port}"
    while health_from_elsewhere(url)[0] != 200:
        time.sleep(0.5)

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{server.pid}/fd"))

    baseline = descriptors()
    socks = []
    for _ in range(args.connections):
        sock = socket.socket()
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
        socks.append(sock)
    report: dict = {"source": str(args.source), "connections": len(socks)}
    for at, wait in ((1, 1), (12, 11)):  # past the default 10 s --header-timeout
        time.sleep(wait)
        report[f"at_{at}s"] = {"server_descriptors_added": descriptors() - baseline,
                               "health": health_from_elsewhere(url), "ended": ended(socks)}
    for sock in socks:
        sock.close()
    return report


if __name__ == "__main__":
    main()
