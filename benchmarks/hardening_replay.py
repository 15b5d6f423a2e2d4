"""Issue 24's findings replayed against a live `kvflow serve` (the demo model unless --model
is given): each row's requests as the report sent them, with what the server answers now,
how long it took, and for the rows that stalled others, an ordinary request's latency
while the attack runs beside it. The server must be healthy after every row.

Usage:
    python benchmarks/hardening_replay.py [--model PATH]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time
from collections.abc import Callable

import httpx

from constrained_load import serving

API_KEY = "replay-key"
CHAT = "/v1/chat/completions"


def _chat(**fields: object) -> dict:
    return {"messages": [{"role": "user", "content": "Describe a cat."}], "max_tokens": 8,
            **fields}


def _ref_chain(depth: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def _any_of(branches: int) -> dict:
    return {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}},
                       "required": [f"k{i}"], "additionalProperties": False}
                      for i in range(branches)]}


def _tools(count: int) -> list[dict]:
    return [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
        "type": "object", "properties": {}}}} for i in range(count)]


ROWS: list[tuple[str, str, Callable[[], dict], int]] = [
    # (row, what, body, how many at once)
    ("1", "greedy min_tokens, bf16 (x5)", lambda: {"prompt": "hello world", "max_tokens": 8,
                                                  "temperature": 0, "min_tokens": 4}, 5),
    ("1", "greedy bad_words (x5)", lambda: {"prompt": "hello world", "max_tokens": 8,
                                            "temperature": 0, "bad_words": ["print"]}, 5),
    ("2", "1,000 chained $refs", lambda: _chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": _ref_chain(1000)}}), 1),
    ("2", "the same as a named tool", lambda: _chat(
        tools=[{"type": "function", "function": {"name": "f", "parameters": _ref_chain(1000)}}],
        tool_choice={"type": "function", "function": {"name": "f"}}), 1),
    ("2", "Lark grammar, 3,000 chained rules", lambda: _chat(structured_outputs={
        "grammar": "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(3000))
                   + 'r3000: "a"\n'}), 1),
    ("2", "GBNF, 10,000 chained rules", lambda: _chat(structured_outputs={
        "grammar": "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(10000))
                   + 'r10000 ::= "a"\n'}), 1),
    ("3", "anyOf of 2,000 objects, n=64", lambda: _chat(n=64, max_tokens=16, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": _any_of(2000)}}), 1),
    ("4", "80,000 tools", lambda: _chat(tools=_tools(80000)), 1),
    ("4", "40,000 tools (x2)", lambda: _chat(tools=_tools(40000)), 2),
    ("5", "tool-call arguments nested 5,000 deep", lambda: {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}], "max_tokens": 8}, 1),
    ("5", "chat_template_kwargs nested 400 deep", lambda: _chat(
        chat_template_kwargs={"a": _nested(400)}), 1),
    ("6", "100,000 stop strings", lambda: _chat(stop=[f"s{i}" for i in range(100000)]), 1),
    ("6", "409,600 allowed_token_ids", lambda: _chat(allowed_token_ids=[5] * 409600), 1),
    ("8", "regex (a{1000}){1000}", lambda: _chat(structured_outputs={
        "regex": "(a{1000}){1000}"}), 1),
    ("8", "multipleOf -1", lambda: _chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "number", "multipleOf": -1}}}), 1),
    ("8", "x-guidance options", lambda: _chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "x-guidance": {"whitespace_flexible": True}}}}), 1),
]


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def _victim(http: httpx.Client) -> float:
    start = time.perf_counter()
    http.post(CHAT, json=_chat(max_tokens=16, temperature=0)).raise_for_status()
    return time.perf_counter() - start


def _timed_post(http: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = http.post(path, json=body)
    return response, time.perf_counter() - start


def _row(http: httpx.Client, make: Callable[[], dict], copies: int, path: str
         ) -> tuple[str, float, float]:
    """(status codes and the first error's message, the slowest copy's seconds, the
    victim's median seconds while the copies ran)."""
    body = make()
    with concurrent.futures.ThreadPoolExecutor(copies + 1) as pool:
        attacks = [pool.submit(_timed_post, http, path, body) for _ in range(copies)]
        victims = []
        while not all(a.done() for a in attacks):
            victims.append(_victim(http))
        results = [a.result() for a in attacks]
    responses = [response for response, _ in results]
    seconds = max(elapsed for _, elapsed in results)
    codes = ",".join(str(r.status_code) for r in responses)
    failed = next((r for r in responses if r.status_code >= 400), None)
    message = failed.json().get("error", {}).get("message", "")[:110] if failed else ""
    return f"{codes} {message}".strip(), seconds, (statistics.median(victims)
                                                   if victims else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with serving(args.model, flags, "hardening_replay") as (url, _):
        with httpx.Client(base_url=url, timeout=300) as http:
            quiet = statistics.median(_victim(http) for _ in range(5))
            print(f"an ordinary 16-token chat alone: {quiet:.2f} s")
            print("| row | request | answer | seconds | ordinary chat beside it (s) |")
            print("| --- | --- | --- | --- | --- |")
            for row, what, make, copies in ROWS:
                path = "/v1/completions" if "prompt" in make() else CHAT
                answer, seconds, victim = _row(http, make, copies, path)
                assert http.get("/health").status_code == 200, f"unhealthy after {what}"
                print(f"| {row} | {what} | {answer} | {seconds:.2f} | {victim:.2f} |",
                      flush=True)
    with serving(args.model, ["--api-key", API_KEY], "hardening_replay_key") as (url, _):
        routes = {route: httpx.get(url + route).status_code
                  for route in ("/metrics", "/load", "/ping", "/health", "/version")}
        print(f"| 8 | with --api-key, no key | {routes} | | |")


if __name__ == "__main__":
    main()
