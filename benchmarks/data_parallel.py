"""Data parallelism on one machine's CPUs: a multi-turn chat trace against two engine cores
routed by prefix, the same two cores round-robin, and one engine with every core.

    python benchmarks/data_parallel.py --model MODEL [--conversations 32] [--turns 6]
        [--system-tokens 1000] [--user-tokens 48] [--reply-tokens 32]
        [--kv-cache-memory 1GiB] [--out docs/benchmarks/DATE-dp.json]

Every conversation shares one system prompt and sends its whole history each turn: the
previous turns' user messages and the replies the server gave (their text, tokenized
again, as a chat client's template would send them; a random-weight checkpoint's replies
often decode to no text at all, and then as many random tokens stand for each reply).
By default every conversation starts at once and sends its next turn as soon as the last
is answered, which saturates the server; --stagger-s and --think-s pace it like people. The conversations run at once, each
turn after the last one's answer. Each server gets the same KV cache in all (a core
under -dp 2 gets half). Reported per configuration: the prefix-cache hit rate (prompt
tokens found over those looked up, from /metrics), TTFT p50/p99, inter-token latency
p50, output tokens per second over the whole trace, and the router's decisions.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_servers import default_kvflow_python, free_port, kvflow_command, running  # noqa: E402

from kvflow.bench.hardware import inventory  # noqa: E402
from kvflow.config import parse_memory  # noqa: E402


def _counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    totals: dict[str, float] = {}
    for name, labels, value in re.findall(r"^kvflow:(\w+)(?:\{([^}]*)\})? (\S+)$", text,
                                          re.MULTILINE):
        key = name
        decision = re.search(r'decision="([^"]+)"', labels or "")
        if decision:
            key += ":" + decision.group(1)
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


async def _turn(client: httpx.AsyncClient, prompt: list[int], reply_tokens: int,
                record: dict) -> str:
    body = {"model": "m", "prompt": prompt, "max_tokens": reply_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    start = last = time.perf_counter()
    text = ""
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("error"):
                raise RuntimeError(event["error"])
            choices = event.get("choices") or []
            if not choices:
                continue
            # An event per token, its text empty while a character's bytes are incomplete
            # (a random-weight model's replies may never complete one).
            piece = "".join(c.get("text") or "" for c in choices)
            now = time.perf_counter()
            if "ttft" not in record:
                record["ttft"] = now - start
            else:
                record.setdefault("gaps", []).append(now - last)
            last = now
            text += piece
    record["tokens"] = reply_tokens
    return text


async def _trace(url: str, tokenizer, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    vocab = min(tokenizer.vocab_size, 32000)
    system = [rng.randrange(1000, vocab) for _ in range(args.system_tokens)]
    users = [[[rng.randrange(1000, vocab) for _ in range(args.user_tokens)]
              for _ in range(args.turns)] for _ in range(args.conversations)]
    records: list[dict] = []

    async def conversation(client: httpx.AsyncClient, index: int) -> None:
        await asyncio.sleep(index * args.stagger_s)
        history = list(system)
        for turn in range(args.turns):
            if turn:
                await asyncio.sleep(args.think_s)
            history += users[index][turn]
            record = {"conversation": index, "turn": turn, "prompt_tokens": len(history)}
            reply = await _turn(client, history, args.reply_tokens, record)
            records.append(record)
            reply_ids = tokenizer.encode(reply, add_special_tokens=False)
            # A reply with no text stands as as many tokens no core has computed: the
            # next turn pays for them wherever it runs, as for a reply re-tokenized apart.
            history += reply_ids or [rng.randrange(1000, vocab)
                                     for _ in range(args.reply_tokens)]

    limits = httpx.Limits(max_connections=args.conversations + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(conversation(client, i) for i in range(args.conversations)))
        seconds = time.perf_counter() - started
    ttfts = sorted(r["ttft"] for r in records)
    gaps = sorted(g for r in records for g in r.get("gaps", []))
    return {"seconds": seconds, "requests": len(records),
            "output_tokens": sum(r["tokens"] for r in records),
            "output_tok_s": sum(r["tokens"] for r in records) / seconds,
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "itl_p50_s": statistics.median(gaps) if gaps else None,
            "first_turn_ttft_p50_s": statistics.median(
                r["ttft"] for r in records if r["turn"] == 0),
            "later_turn_ttft_p50_s": statistics.median(
                r["ttft"] for r in records if r["turn"] > 0),
            "ttft_by_turn_p50_s": [statistics.median(r["ttft"] for r in records
                                                     if r["turn"] == turn)
                                   for turn in range(args.turns)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--user-tokens", type=int, default=48)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stagger-s", type=float, default=0.0,
                        help="seconds between the starts of two conversations")
    parser.add_argument("--think-s", type=float, default=0.0,
                        help="seconds between an answer and the next turn")
    parser.add_argument("--balance-threshold", type=int, default=None,
                        help="--data-parallel-balance-threshold (default: the server's)")
    parser.add_argument("--configs", default="prefix,round-robin,single")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    memory = parse_memory(args.kv_cache_memory)
    python = default_kvflow_python()
    results: dict[str, dict] = {}
    for config in args.configs.split(","):
        flags = ["--served-model-name", "m", "--disable-uvicorn-access-log",
                 "--max-model-len", "4096"]
        if config == "single":
            flags += ["--kv-cache-memory", str(memory)]
        else:
            flags += ["--kv-cache-memory", str(memory // 2), "--data-parallel-size", "2",
                      "--data-parallel-routing", config]
            if args.balance_threshold is not None:
                flags += ["--data-parallel-balance-threshold", str(args.balance_threshold)]
        port = free_port()
        log = Path("/tmp") / f"kvflow-dp-bench-{config}.log"
        with running(kvflow_command(python, Path(args.model), port, *flags), port, log) as server:
            before = _counters(server.url)
            result = asyncio.run(_trace(server.url, tokenizer, args))
            after = _counters(server.url)
        grown = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        queries = grown.get("prefix_cache_queries_total", 0.0)
        result["prefix_hit_rate"] = grown.get("prefix_cache_hits_total", 0.0) / queries \
            if queries else 0.0
        result["prompt_tokens_computed"] = grown.get("prompt_tokens_total", 0.0)
        result["router_decisions"] = {k.split(":", 1)[1]: v for k, v in grown.items()
                                      if k.startswith("router_decisions_total:") and v}
        results[config] = result
        print(config, json.dumps(result), flush=True)
    hardware = inventory()
    report = {"machine": {k: hardware[k] for k in ("cpu", "cpu_id", "usable_cores", "isa",
                                                   "memory_bytes", "torch")},
              "date": time.strftime("%Y-%m-%d"), "model": args.model,
              "trace": {k: getattr(args, k) for k in (
                  "conversations", "turns", "system_tokens", "user_tokens", "reply_tokens",
                  "kv_cache_memory", "stagger_s", "think_s", "balance_threshold")},
              "results": results}
    print(f"{'config':12} {'hit rate':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
          f"{'out tok/s':>9} {'computed':>9}")
    for config, r in results.items():
        print(f"{config:12} {r['prefix_hit_rate']:8.3f} {r['ttft_p50_s']:9.3f} "
              f"{r['ttft_p99_s']:9.3f} {(r['itl_p50_s'] or 0):8.3f} {r['output_tok_s']:9.1f} "
              f"{r['prompt_tokens_computed']:9.0f}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
