"""Time to first token and inter-token latency of a running OpenAI-compatible server,
measured by a streaming client at fixed concurrency.

    kvflow serve &    # the default demo model on 127.0.0.1:8000
    python benchmarks/serve_latency.py --concurrency 1 16

Each request sends random token ids (numpy seed 0) and streams /v1/completions with
logprobs=0, so that every event carries its tokens and gaps are divided per token.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
import numpy as np


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int],
                      max_tokens: int) -> tuple[float, list[float]]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0, "logprobs": 0}
    start = time.perf_counter()
    ttft, gaps, last = None, [], None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            tokens = sum(len((c.get("logprobs") or {}).get("tokens", [])) for c in choices)
            if not tokens:
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - start
            else:
                gaps.extend([(now - last) / tokens] * tokens)
            last = now
    return ttft, gaps


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def run(base_url: str, model: str, concurrency: int, num_requests: int, prompt_len: int,
              max_tokens: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, vocab - 100, prompt_len).tolist() for _ in range(num_requests)]
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async def bounded(prompt: list[int]) -> tuple[float, list[float]]:
            async with limit:
                return await one_request(client, model, prompt, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        elapsed = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return {"concurrency": concurrency, "requests": num_requests,
            "ttft_median_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * percentile(ttfts, 99),
            "itl_median_ms": 1000 * statistics.median(gaps),
            "itl_p99_ms": 1000 * percentile(gaps, 99),
            "generated_tokens_per_s": num_requests * max_tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="prompt ids are drawn from [100, vocab-100); 4096 is the demo model's")
    args = parser.parse_args()
    model = httpx.get(args.base_url + "/v1/models").json()["data"][0]["id"]
    for concurrency in args.concurrency:
        result = asyncio.run(run(args.base_url, model, concurrency,
                                 concurrency * args.requests_per_stream, args.prompt_len,
                                 args.max_tokens, args.vocab_size))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
