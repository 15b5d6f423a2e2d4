"""`kvflow bench serve`: an online load generator for any OpenAI-compatible server.

Streams /v1/completions with token-id prompts (greedy, ignore_eos, max_tokens = the
request's output_len), with Poisson arrivals at a request rate or a fixed concurrency.
Per request: time to first token (the first chunk with a choice, text or not: a token
that decodes to no text yet is still a token), inter-token latency (the gap between
chunks divided by the tokens in the later one, which `logprobs` tells where the server
sends it, else one), end-to-end latency, and time per output token after the first.
Output tokens are the server's `usage` where it reports one, else the chunks' tokens."""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from kvflow.bench.results import RunResult, distribution, samples_ms
from kvflow.bench.workload import BenchRequest, Workload


@dataclass
class RequestRecord:
    prompt_tokens: int
    expected_tokens: int
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    chunk_gaps: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class LoadSettings:
    request_rate: float = math.inf
    max_concurrency: int | None = None
    timeout_s: float = 600.0
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive or inf, got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")


async def _stream_one(client: httpx.AsyncClient, model: str, request: BenchRequest,
                      record: RequestRecord) -> None:
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
            "ignore_eos": True}
    start = last = time.perf_counter()
    streamed = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if not isinstance(event, dict):
                    raise ValueError(f"a stream event that is not an object: {line[:200]}")
                if event.get("error"):
                    record.error = str(event["error"])
                    return
                if (event.get("usage") or {}).get("completion_tokens"):
                    record.output_tokens = event["usage"]["completion_tokens"]
                # A closing chunk with no text (llama.cpp sends one) carries no token.
                choices = [c for c in event.get("choices") or []
                           if c.get("text") or c.get("logprobs") or not c.get("finish_reason")]
                if not choices:
                    continue
                tokens = sum(len((c.get("logprobs") or {}).get("tokens") or [None])
                             for c in choices)
                now = time.perf_counter()
                if record.ttft is None:
                    record.ttft = now - start
                else:
                    record.chunk_gaps.extend([(now - last) / tokens] * tokens)
                last = now
                streamed += tokens
        record.e2e = time.perf_counter() - start
        record.output_tokens = record.output_tokens or streamed
        if record.ttft is None:
            record.error = "the stream ended without a token"
    except Exception as exc:  # noqa: BLE001 - one request's failure must not end the run
        record.error = f"{type(exc).__name__}: {exc}"


async def served_model(client: httpx.AsyncClient) -> str:
    """The first model a server lists."""
    try:
        listed = await client.get("/v1/models")
        listed.raise_for_status()
        return listed.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"cannot list the models of {client.base_url}: "
                         f"{type(exc).__name__}: {exc}") from exc


def _arrival_gaps(count: int, rate: float, seed: int) -> np.ndarray:
    if math.isinf(rate):
        return np.zeros(count)
    return np.random.default_rng(seed).exponential(1.0 / rate, count)


async def _run(base_url: str, workload: Workload, settings: LoadSettings,
               model: str | None) -> tuple[list[RequestRecord], float, str]:
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    # A fresh connection per request: a server may close an idle kept-alive connection just
    # as the next request is sent on it (llama-server did), failing a request that was fine.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(settings.timeout_s)) as client:
        if model is None:
            model = await served_model(client)
        limit = asyncio.Semaphore(settings.max_concurrency or len(workload.requests))
        records = [RequestRecord(len(r.prompt_token_ids), r.output_len)
                   for r in workload.requests]

        async def bounded(request: BenchRequest, record: RequestRecord) -> None:
            async with limit:
                await _stream_one(client, model, request, record)

        tasks = []
        start = time.perf_counter()
        gaps = _arrival_gaps(len(records), settings.request_rate, settings.seed)

        async def launch() -> None:
            for gap, request, record in zip(gaps, workload.requests, records):
                if gap:
                    await asyncio.sleep(gap)
                tasks.append(asyncio.create_task(bounded(request, record)))

        async def launch_and_wait() -> None:
            await launch()
            await asyncio.gather(*tasks)

        try:
            await asyncio.wait_for(launch_and_wait(), settings.timeout_s)
        except asyncio.TimeoutError:
            for record in records:
                if record.e2e is None and record.error is None:
                    record.error = f"not finished within the {settings.timeout_s:g} s bound"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return records, time.perf_counter() - start, model


def run_serve(base_url: str, workload: Workload, settings: LoadSettings,
              model: str | None = None, system: str = "server") -> RunResult:
    records, seconds, model = asyncio.run(_run(base_url.rstrip("/"), workload, settings, model))
    done = [r for r in records if r.error is None and r.e2e is not None]
    done_lengths = [(r.prompt_tokens, r.output_tokens) for r in done]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tpots = [r.tpot for r in done if r.tpot is not None]
    itls = [g for r in done for g in r.chunk_gaps]
    latency = {"ttft": distribution(ttfts), "tpot": distribution(tpots),
               "itl": distribution(itls),
               "ttft_samples_ms": samples_ms(ttfts), "itl_samples_ms": samples_ms(itls),
               "e2e": distribution([r.e2e for r in done]),
               "failed": len(records) - len(done),
               "errors": sorted({r.error for r in records if r.error})[:5],
               "short_outputs": sum(r.output_tokens < r.expected_tokens for r in done)}
    if settings.slo_ttft_ms is not None or settings.slo_tpot_ms is not None:
        good = [r for r in done
                if (settings.slo_ttft_ms is None or 1000 * r.ttft <= settings.slo_ttft_ms)
                and (settings.slo_tpot_ms is None or r.tpot is None
                     or 1000 * r.tpot <= settings.slo_tpot_ms)]
        latency["goodput_requests_per_s"] = len(good) / seconds
        latency["slo"] = {"ttft_ms": settings.slo_ttft_ms, "tpot_ms": settings.slo_tpot_ms}
    return RunResult(system=system, workload=workload.name, num_requests=len(done),
                     seconds=seconds, prompt_tokens=sum(r.prompt_tokens for r in done),
                     generated_tokens=sum(r.output_tokens for r in done),
                     settings={"base_url": base_url, "model": model,
                               "request_rate": settings.request_rate,
                               "max_concurrency": settings.max_concurrency,
                               "requests_sent": len(records), "completed_lengths": done_lengths},
                     latency=latency)
