"""Where one engine step's time goes, by category, for docs/performance.md.

Three steps on a model of a given shape (random weights):
- single-stream decode: one request, a real `LLMEngine.step()` (scheduler, runner,
  sampler and output processing included), at a context of about 200 tokens;
- prefill: one 2,048-token prompt in one step (`--prefill-tokens` for other lengths);
- batch decode: 128 requests decoding one token each at a context of 300, driven through
  the model runner with a synthetic schedule (computing those contexts first would take
  minutes; the KV cache holds zeros, which costs the same to read), plus the scheduler and
  output processor timed on their own for 128 running requests.

Categories come from torch.profiler ranges wrapped around the functions that do each kind
of work; "other" is everything else in the step: Python, dispatch and small tensor ops.

    python benchmarks/profile_step.py --model PATH [--steps 10] [engine options]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from kvflow import LLM, SamplingParams
from kvflow.core.scheduler import Scheduler
from kvflow.engine.output_processor import OutputProcessor
from kvflow.layers import activation, linear, norm, rotary
from kvflow.layers.attention import PagedAttention
from kvflow.outputs import ScheduledRequest, SchedulerOutput
from kvflow.sampling import sampler
from kvflow.worker.model_runner import ModelRunner

# (category, owner, attribute): every call of owner.attribute is timed as the category.
PROBES: list[tuple[str, object, str]] = [
    ("linear layers", linear.Linear, "forward"),
    ("LM head", None, "compute_logits"),  # bound to the model's class at run time
    ("attention", PagedAttention, "forward"),
    ("norms/RoPE/activation", norm.RMSNorm, "forward"),
    ("norms/RoPE/activation", rotary.RotaryEmbedding, "forward"),
    ("norms/RoPE/activation", activation.SiluAndMul, "forward"),
    ("sampler", sampler.Sampler, "__call__"),
    ("sampler", sampler, "prepare_sampling"),
    ("input preparation", ModelRunner, "_prepare_inputs"),
    ("scheduler", Scheduler, "schedule"),
    ("scheduler", Scheduler, "update_from_output"),
    ("output processing", OutputProcessor, "process"),
]


@contextlib.contextmanager
def probes(model_class: type) -> Iterator[None]:
    saved = []
    for category, owner, name in PROBES:
        owner = owner or model_class
        original = getattr(owner, name)

        def wrapped(*args, __original=original, __category=category, **kwargs):
            with record_function(f"## {__category}"):
                return __original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, functools.wraps(original)(wrapped))
    # The runner imported the function itself, not the module attribute.
    import kvflow.worker.model_runner as runner_module
    saved.append((runner_module, "prepare_sampling", runner_module.prepare_sampling))
    runner_module.prepare_sampling = sampler.prepare_sampling
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def median_ms(fn: Callable[[], object], steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def breakdown(fn: Callable[[], object], model_class: type, steps: int) -> dict[str, float]:
    """Share of the profiled step's time per category, 'other' the rest."""
    with probes(model_class), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        total = (time.perf_counter() - start) * 1e6
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("## "):
            shares[event.key[3:]] = event.cpu_time_total / total
    shares["other (Python, dispatch, small ops)"] = max(0.0, 1 - sum(shares.values()))
    return shares


def kernel_share(fn: Callable[[], object], steps: int) -> tuple[float, float] | None:
    """(ms per step, share of it) spent inside kvflow's native kernels, timed around each
    call; the rest of a native single-stream step is Python, dispatch and small ops."""
    from kvflow.kernels import cpu_ops

    ops = cpu_ops()
    if ops is None:
        return None
    inside = [0.0]
    # Every entry point of the build (the quantized GEMVs and the experts' kernel too),
    # looked up on the module at each call, so that wrapping them here times them all.
    originals = {name: getattr(ops, name) for name in dir(ops)
                 if not name.startswith("_") and callable(getattr(ops, name))}

    def timed(original):  # noqa: ANN001, ANN202
        def call(*args):  # noqa: ANN002, ANN202
            start = time.perf_counter()
            try:
                return original(*args)
            finally:
                inside[0] += time.perf_counter() - start
        return call

    for name, original in originals.items():
        setattr(ops, name, timed(original))
    try:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        total = time.perf_counter() - start
    finally:
        for name, original in originals.items():
            setattr(ops, name, original)
    return 1e3 * inside[0] / steps, inside[0] / total


def table(title: str, wall_ms: float, shares: dict[str, float]) -> str:
    lines = [f"### {title}: {wall_ms:.1f} ms per step (median, unprofiled)", "",
             "| category | share | ms |", "| --- | --- | --- |"]
    for category, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {category} | {100 * share:.1f}% | {share * wall_ms:.1f} |")
    return "\n".join(lines)


def synthetic_step(llm: LLM, num_reqs: int, query_len: int, context: int) -> SchedulerOutput:
    block_size = llm.engine.cache_config.block_size
    blocks_per_req = -(-(context + query_len) // block_size)
    params = SamplingParams(temperature=0, max_tokens=1)
    scheduled = [
        ScheduledRequest(req_id=str(i), token_ids=[100 + i % 50] * query_len,
                         num_computed_tokens=context,
                         block_ids=list(range(1 + i * blocks_per_req,
                                              1 + (i + 1) * blocks_per_req)),
                         sample=True, sampling_params=params, prompt_token_ids=[100] * context,
                         output_token_ids=[], stop_token_ids=frozenset())
        for i in range(num_reqs)]
    return SchedulerOutput(scheduled=scheduled, num_batched_tokens=num_reqs * query_len)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--quantize-lm-head", action="store_true")
    parser.add_argument("--single-stream-only", action="store_true",
                        help="skip the prefill and batch decode steps")
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[2048],
                        help="the prompt lengths of the prefill steps profiled")
    ns = parser.parse_args()
    llm = LLM(model=ns.model, dtype=ns.dtype, kv_cache_memory="2GiB",
              attention_backend=ns.attention_backend, quantization=ns.quantization,
              quantize_lm_head=ns.quantize_lm_head)
    engine = llm.engine
    model_class = type(engine.runner.model)
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"attention backend {engine.runner.backend.name}")

    prompt = rng.integers(100, min(vocab, 4096) - 100, 200).tolist()
    engine.add_request("one", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True))
    engine.step()
    for _ in range(3):
        engine.step()
    wall = median_ms(engine.step, ns.steps * 2)
    title = "single-stream decode (real engine step, context ~200)"
    if engine.runner.graphs is not None:
        # A captured step replays its kernel calls as recorded (kvflow/worker/cpu_graphs.py),
        # past the probes and timers below: they measure the step through Python.
        print(f"### {title}, captured: {wall:.1f} ms per step (median)\n")
        engine.runner.graphs = None
        wall = median_ms(engine.step, ns.steps * 2)
        title += ", through Python"
    print(table(title, wall, breakdown(engine.step, model_class, ns.steps)))
    inside = kernel_share(engine.step, ns.steps * 2)
    if inside is not None:
        print(f"\ntime inside native kernels: {inside[0]:.1f} ms per step "
              f"({100 * inside[1]:.1f}%); "
              f"outside them (Python, dispatch, embedding, sampler, scheduler, output): "
              f"{100 * (1 - inside[1]):.1f}%")
    engine.abort_request("one")
    engine.step()
    if ns.single_stream_only:
        return

    runner = engine.runner

    def execute(step):  # noqa: ANN001, ANN202 - one step through the runner, start to end
        return runner.finish(runner.submit(step))

    prefills = [(f"prefill of {tokens:,} tokens", synthetic_step(llm, 1, tokens, 0))
                for tokens in ns.prefill_tokens]
    for title, step in [*prefills, ("decode of 128 requests at context 300",
                                    synthetic_step(llm, 128, 1, 300))]:
        execute(step)
        steps = max(2, ns.steps // 3) if "prefill" in title else ns.steps
        wall = median_ms(lambda: execute(step), steps)
        print()
        print(table(title + " (model runner only)", wall,
                    breakdown(lambda: execute(step), model_class, steps)))

    # Scheduler and output processing for 128 running requests, on their own.
    for i in range(128):
        engine.add_request(f"b{i}", {"prompt_token_ids": rng.integers(100, 300, 8).tolist()},
                           SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True))
    engine.step()
    scheduler, processor = engine.scheduler, engine.output_processor
    times = []
    for _ in range(ns.steps):
        out = scheduler.schedule()
        runner_out = execute(out)
        start = time.perf_counter()
        updated = scheduler.update_from_output(out, runner_out)
        processor.process(runner_out, updated)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        scheduler.schedule()  # the next step's schedule, timed alone
        times[-1] += time.perf_counter() - start
        scheduler.running.sort(key=scheduler._key)
    print(f"\nscheduler + output processing for 128 running requests: "
          f"{1e3 * statistics.median(times):.1f} ms per step (median)")


if __name__ == "__main__":
    main()
