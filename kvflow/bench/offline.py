"""kvflow's engine in process: `kvflow bench throughput` and `kvflow bench latency`."""
from __future__ import annotations

import time

from kvflow.bench.results import RunResult, distribution, samples_ms
from kvflow.bench.workload import Workload


# What constrained requests follow: a JSON string too long to finish within any workload's
# output, so that they generate exactly as many tokens as unconstrained ones and the run
# differs only by the masks.
BENCH_SCHEMA = {"type": "object", "required": ["text"], "additionalProperties": False,
                "properties": {"text": {"type": "string", "minLength": 4096}}}


def _params(output_len: int, constrained: bool = False):  # noqa: ANN202
    from kvflow import SamplingParams, StructuredOutputsParams

    return SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True,
                          structured_outputs=StructuredOutputsParams(json=BENCH_SCHEMA)
                          if constrained else None)


def _constrained(index: int, fraction: float) -> bool:
    """Spreads a fraction of the requests evenly over the workload."""
    return int((index + 1) * fraction) > int(index * fraction)


def _warm_up(llm, workload: Workload, constrained: bool) -> None:  # noqa: ANN001
    # A constrained one too, if any will be: the grammar engine's tokenizer and the
    # schema's compilation are built once per engine, not per run.
    first = workload.requests[0].prompt_token_ids[:32]
    llm.generate({"prompt_token_ids": first}, _params(4, constrained), use_tqdm=False)
    # The timed run starts cold: what it reuses, it computed itself.
    llm.engine.reset_prefix_cache()


def run_kvflow(llm, workload: Workload, use_tqdm: bool = False,  # noqa: ANN001
               structured_fraction: float = 0.0) -> RunResult:
    """All requests at once, or one at a time for a single-stream workload; greedy,
    ignore_eos, each request generating exactly its output_len tokens. A fraction of them
    may be constrained to BENCH_SCHEMA (structured output)."""
    _warm_up(llm, workload, structured_fraction > 0)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    params = [_params(r.output_len, _constrained(i, structured_fraction))
              for i, r in enumerate(workload.requests)]
    start = time.perf_counter()
    if workload.single_stream:
        outputs = [llm.generate(p, s, use_tqdm=False)[0] for p, s in zip(prompts, params)]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    seconds = time.perf_counter() - start
    ttft, tpot = [], []
    for output in outputs:
        m = output.metrics
        ttft.append(m.first_token_time - m.arrival_time)
        generated = len(output.outputs[0].token_ids)
        if generated > 1:
            tpot.append((m.finished_time - m.first_token_time) / (generated - 1))
    config = llm.engine.scheduler_config
    return RunResult(
        system="kvflow", workload=workload.name, num_requests=len(outputs), seconds=seconds,
        prompt_tokens=workload.prompt_tokens,
        generated_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        settings={"max_num_seqs": config.max_num_seqs,
                  "max_num_batched_tokens": config.max_num_batched_tokens,
                  "dtype": str(llm.engine.dtype).removeprefix("torch."),
                  "preemptions": llm.engine.scheduler.num_preemptions_total,
                  "enable_prefix_caching": llm.engine.kv_manager.enable_caching,
                  "cached_prompt_tokens": sum(o.num_cached_tokens or 0 for o in outputs),
                  "one_at_a_time": workload.single_stream,
                  "structured_output_fraction": structured_fraction},
        latency={"ttft": distribution(ttft), "tpot": distribution(tpot),
                 "ttft_samples_ms": samples_ms(ttft)})


def latency_summary(result: RunResult) -> str:
    ttft, tpot = result.latency["ttft"], result.latency["tpot"]
    lines = [f"time to first token: median {ttft['p50_ms']:.1f} ms, p99 {ttft['p99_ms']:.1f} ms"]
    if tpot:
        lines.append(f"decode: median {tpot['p50_ms']:.2f} ms per token = "
                     f"{1000 / tpot['p50_ms']:.1f} tokens/s per stream")
    else:
        lines.append("decode: no second token to time (output length 1)")
    return "\n".join(lines)
