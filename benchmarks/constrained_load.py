"""64 clients of mixed requests against one `kvflow serve`, for a while, with its resident
memory read every minute: plain completions and chats, JSON schemas, regular expressions,
choices, forced, named and automatic tool calls, streamed or not, some abandoned part-way.

Usage (the server is started here, on the demo model unless --model is given):
    python benchmarks/constrained_load.py --seconds 600 [--model PATH] [--clients 64]

Prints one line per minute (requests by outcome, RSS) and a summary; a request answered
with a 5xx, or a 200 whose constrained output does not parse, counts as a failure.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "count": {"type": "integer", "minimum": 0}},
          "required": ["name", "count"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16}}, "required": ["city"]}}}
REGEX = r"[a-z]{3,8}-[0-9]{2,4}"
PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\nimport sys\n", "Describe a cat.",
           "The weather in Paris is", "def add(a, b):\n    return"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def _request(rng: random.Random) -> tuple[str, str, dict, str]:
    """(kind, path, body, what the output must be)."""
    prompt = rng.choice(PROMPTS)
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.choice(
        [8, 32, 96]), "temperature": rng.choice([0, 0.8])}
    kind = rng.choice(["plain", "chat", "json_schema", "json_object", "regex", "choice",
                       "named_tool", "required_tool", "auto_tool"])
    if kind == "plain":
        return kind, "/v1/completions", {"prompt": prompt, "max_tokens": 48}, "text"
    if kind == "chat":
        return kind, "/v1/chat/completions", chat, "text"
    if kind == "json_schema":
        chat["max_tokens"] = 200
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "thing", "schema": SCHEMA}}
        return kind, "/v1/chat/completions", chat, "json"
    if kind == "json_object":
        chat["max_tokens"] = 200
        chat["response_format"] = {"type": "json_object"}
        return kind, "/v1/chat/completions", chat, "text"  # may be cut by max_tokens
    if kind == "regex":
        chat["structured_outputs"] = {"regex": REGEX}
        return kind, "/v1/chat/completions", chat, "regex"
    if kind == "choice":
        chat["structured_outputs"] = {"choice": ["yes", "no", "maybe"]}
        return kind, "/v1/chat/completions", chat, "choice"
    chat["tools"] = [WEATHER]
    chat["max_tokens"] = 120
    chat["tool_choice"] = {"named_tool": {"type": "function", "function": {
        "name": "get_weather"}}, "required_tool": "required", "auto_tool": "auto"}[kind]
    return kind, "/v1/chat/completions", chat, "tool" if kind != "auto_tool" else "text"


def _check(expect: str, body: dict) -> str | None:
    choice = body["choices"][0]
    if choice.get("finish_reason") == "length":
        return None  # cut short: nothing to check
    if expect == "tool":
        calls = choice["message"].get("tool_calls") or []
        if not calls:
            return "no tool call"
        json.loads(calls[0]["function"]["arguments"])
        return None
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    if expect == "json":
        json.loads(text)
    elif expect == "regex" and not re.fullmatch(REGEX, text):
        return f"{text!r} does not match"
    elif expect == "choice" and text not in ("yes", "no", "maybe"):
        return f"{text!r} is not a choice"
    return None


async def _client(http: httpx.AsyncClient, rng: random.Random, deadline: float,
                  tally: Tally) -> None:
    while time.monotonic() < deadline:
        kind, path, body, expect = _request(rng)
        stream = rng.random() < 0.3
        try:
            if stream:
                async with http.stream("POST", path, json={**body, "stream": True}) as response:
                    lines = 0
                    async for _ in response.aiter_lines():
                        lines += 1
                        if rng.random() < 0.02:  # an abandoned stream
                            break
                    status = response.status_code
            else:
                response = await http.post(path, json=body)
                status = response.status_code
                if status == 200:
                    problem = _check(expect, response.json())
                    if problem:
                        tally.failures.append(f"{kind}: {problem}")
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            tally.failures.append(f"{kind}: {type(exc).__name__}: {exc}")
            continue
        tally.outcomes[f"{kind} {status}"] += 1
        if status >= 500:
            tally.failures.append(f"{kind}: HTTP {status}")


async def _run(url: str, pid: int, seconds: float, clients: int) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        tasks = [asyncio.create_task(_client(http, random.Random(i), deadline, tally))
                 for i in range(clients)]
        start = time.monotonic()
        print(f"minute 0: RSS {_rss_mib(pid):.0f} MiB", flush=True)
        minute = 1
        while not all(t.done() for t in tasks):
            await asyncio.sleep(1)
            if time.monotonic() - start >= 60 * minute:
                done = sum(tally.outcomes.values())
                print(f"minute {minute}: {done} requests, {len(tally.failures)} failures, "
                      f"RSS {_rss_mib(pid):.0f} MiB", flush=True)
                minute += 1
        await asyncio.gather(*tasks)
    return tally


@contextlib.contextmanager
def serving(model: str | None, flags: list[str], name: str
            ) -> Iterator[tuple[str, subprocess.Popen]]:
    """A `kvflow serve` on a free port, healthy; (its URL, its process). The log goes to a
    file in the temporary folder, named on stdout."""
    port = _free_port()
    command = [sys.executable, "-m", "kvflow.cli", "serve", *([model] if model else []),
               "--port", str(port), *flags]
    log_path = Path(tempfile.gettempdir()) / f"{name}.{port}.log"
    print(f"server log: {log_path}", flush=True)
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"the server exited; see {log_path}")
            time.sleep(0.5)
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: the demo)")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--serve-flag", action="append", default=[],
                        help="an extra kvflow serve flag (repeat it)")
    args = parser.parse_args()
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", *args.serve_flag]
    with serving(args.model, flags, "constrained_load") as (url, server):
        tally = asyncio.run(_run(url, server.pid, args.seconds, args.clients))
        after = httpx.get(url + "/metrics").text
        running = [line for line in after.splitlines()
                   if line.startswith("kvflow:num_requests_running{")]
        print(f"requests: {sum(tally.outcomes.values())}; by kind and status: "
              f"{dict(sorted(tally.outcomes.items()))}")
        print(f"failures: {len(tally.failures)} {Counter(tally.failures).most_common(5)}")
        print(f"health after: {httpx.get(url + '/health').status_code}; {running}")
        print(f"RSS at the end: {_rss_mib(server.pid):.0f} MiB")
        return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
