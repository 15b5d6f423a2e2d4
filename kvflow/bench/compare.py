"""`kvflow bench compare`: kvflow and its peers on the same model and requests, in one run,
with one table, JSON and plots. benchmarks/run_peers.sh calls it."""
from __future__ import annotations

import functools
import gc
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import torch

from kvflow.bench import hardware, llama_cpp, peer_tests
from kvflow.bench.hf_peer import load_hf_model, run_transformers
from kvflow.bench.make_model import tokenizer_vocab_size
from kvflow.bench.memory import checkpoint_bytes, process_memory
from kvflow.bench.offline import run_kvflow
from kvflow.bench.report import (attach_roofline, markdown_table, memory_table, model_config,
                                 plot, summary)
from kvflow.bench.results import RunResult
from kvflow.bench.serve_client import LoadSettings, run_serve
from kvflow.bench.workload import Workload, load_workload

logger = logging.getLogger(__name__)
T = TypeVar("T")

SYSTEMS = ("kvflow", "transformers-one", "transformers-batch", "llama.cpp")
# kvflow's formats, as engine options: the checkpoint's weights as they are, or quantized at
# load; "+head" runs the LM head in int8 too (llama.cpp's quantized files quantize theirs).
KVFLOW_QUANTIZATIONS: dict[str, dict] = {
    "bf16": {}, "int8": {"quantization": "int8"}, "int4": {"quantization": "int4"},
    "bf16+head": {"quantize_lm_head": True},
    "int8+head": {"quantization": "int8", "quantize_lm_head": True},
    "int4+head": {"quantization": "int4", "quantize_lm_head": True}}
# The roofline counts every weight at its dtype's width, so it is only drawn for the
# unquantized runs; a quantized run's "% of roofline" would count bytes it never read.
UNQUANTIZED = ("bf16", "BF16")


def system_name(system: str, weights: str) -> str:
    """A result row's system: which engine, on which weights ("kvflow int8",
    "llama.cpp Q4_K_M")."""
    return f"{system} {weights}"


@dataclass
class CompareSettings:
    model: Path
    workloads: list[str]
    out: Path
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    hf_one_at_a_time_requests: int | None = 8
    hf_batch_size: int = 32
    llama_cpp_parallel: list[int] = field(default_factory=lambda: [8, 32])
    kv_cache_memory: str | None = None
    dtype: str = "bfloat16"
    kvflow_quantizations: list[str] = field(default_factory=lambda: ["bf16"])
    llama_cpp_types: list[str] = field(default_factory=lambda: ["BF16"])
    # llama-bench and llama-batched-bench tests (kvflow/bench/peer_tests.py), each format
    peer_tests: list[str] = field(default_factory=list)
    peer_repetitions: int = 3
    peer_rounds: int = 1
    # Every system's thread count; by default torch's when the settings are made. (An
    # engine's ThreadGovernor lowers torch's count while other processes take cores.)
    threads: int = field(default_factory=torch.get_num_threads)

    def __post_init__(self) -> None:
        for test in self.peer_tests:
            peer_tests.PeerTest.parse(test)
        if not self.workloads and not self.peer_tests:
            raise ValueError("nothing to compare: give workloads, peer tests or both")
        for name, chosen, known in (("systems", self.systems, SYSTEMS),
                                    ("kvflow_quantizations", self.kvflow_quantizations,
                                     KVFLOW_QUANTIZATIONS),
                                    ("llama_cpp_types", self.llama_cpp_types,
                                     llama_cpp.GGUF_TYPES)):
            unknown = sorted(set(chosen) - set(known))
            if unknown or not chosen:
                raise ValueError(f"{name}: unknown {unknown or 'none given'}; choose from "
                                 f"{list(known)}")
        counts = {"hf_batch_size": [self.hf_batch_size],
                  "peer_repetitions": [self.peer_repetitions],
                  "peer_rounds": [self.peer_rounds],
                  "llama_cpp_parallel": self.llama_cpp_parallel,
                  "hf_one_at_a_time_requests": [self.hf_one_at_a_time_requests or 1]}
        for name, values in counts.items():
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{name} must be at least 1, got {values}")


def _llama_cpp(settings: CompareSettings, workload: Workload, gguf: Path,
               system: str) -> RunResult:
    """llama-server at each slot count (one for a single-stream workload), the best kept,
    with what that server held in memory once loaded."""
    context = max(p + g for p, g in workload.lengths) + 16
    counts = [1] if workload.single_stream else sorted(
        {min(n, len(workload.requests)) for n in settings.llama_cpp_parallel})
    tried = []
    for parallel in counts:
        result = llama_cpp.without_amx_if_crashed(
            lambda amx: _serve_llama_cpp(settings, workload, gguf, system, parallel, context, amx))
        logger.info("%s -np %d: %.1f generated tokens/s", system, parallel,
                    result.generated_tokens_per_s)
        tried.append(result)
    best = max(tried, key=lambda r: r.generated_tokens_per_s)
    best.settings["tried"] = {r.settings["parallel"]: r.generated_tokens_per_s for r in tried}
    return best


def _serve_llama_cpp(settings: CompareSettings, workload: Workload, gguf: Path, system: str,
                     parallel: int, context: int, amx: bool) -> RunResult:
    log = (llama_cpp.peer_dir() / "logs"
           / f"{settings.out.name}-llama-server-{gguf.stem}-{parallel}.log")
    with llama_cpp.llama_server(gguf, parallel, context, settings.threads, log,
                                amx=amx) as (url, pid):
        memory = {"file": str(gguf), "file_bytes": gguf.stat().st_size,
                  "rss_after_load": process_memory(pid),
                  "buffers": llama_cpp.buffer_sizes(log.read_text(errors="replace")),
                  "tensor_types": llama_cpp.gguf_tensor_types(gguf)}
        memory.update(weight_bytes=llama_cpp.buffer_total(memory["buffers"], "model"),
                      kv_cache_bytes=llama_cpp.buffer_total(memory["buffers"], "KV"))
        result = run_serve(url, workload, LoadSettings(max_concurrency=parallel,
                                                       timeout_s=3600),
                           model="gguf", system=system)
    result.settings.update(parallel=parallel, memory=memory,
                           build=llama_cpp.build_dir(amx).name)
    return result


def _load_kvflow(settings: CompareSettings, quantization: str):  # noqa: ANN202
    """The engine, and what it holds once loaded: its parameters' bytes, and the process's
    resident memory before and after (in one process, so the difference is the load's)."""
    from kvflow import LLM

    before = process_memory()
    llm = LLM(str(settings.model), dtype=settings.dtype, device="cpu",
              **KVFLOW_QUANTIZATIONS[quantization],
              kv_cache_memory=settings.kv_cache_memory, num_threads=settings.threads)
    runner = llm.engine.runner
    memory = {"file": str(settings.model), "file_bytes": checkpoint_bytes(settings.model),
              "weight_bytes": sum(p.numel() * p.element_size()
                                  for p in runner.model.parameters()),
              "kv_cache_bytes": sum(t.numel() * t.element_size()
                                    for layer in runner.kv_caches for t in layer),
              "rss_before_load": before, "rss_after_load": process_memory()}
    return llm, memory


def compare(settings: CompareSettings) -> list[RunResult]:
    """Every system on every workload, kvflow and llama.cpp in each of their formats. A
    system that fails on a workload (out of memory, a peer that will not build) is reported
    as failed, and the others still run."""
    dtype = getattr(torch, settings.dtype)
    config = model_config(settings.model)
    vocab = tokenizer_vocab_size(settings.model)
    ceiling = hardware.ceilings()
    workloads = [load_workload(w, vocab) for w in settings.workloads]
    results: list[RunResult] = []
    failures: list[dict] = []
    peer_results: list[peer_tests.PeerTestResult] = []
    tests = [peer_tests.PeerTest.parse(t) for t in settings.peer_tests]

    def attempt(system: str, what: str, run: Callable[[], T]) -> T | None:
        """run's result, or None with the failure logged and reported: one system's failure
        must not end the run."""
        try:
            return run()
        except Exception as exc:  # noqa: BLE001
            logger.exception("%s failed on %s", system, what)
            failures.append({"system": system, "workload": what,
                             "error": f"{type(exc).__name__}: {exc}"[:500]})
            return None

    def record_tests(system: str, round_: int,
                     run: Callable[[peer_tests.PeerTest], peer_tests.PeerTestResult],
                     beside: dict) -> None:
        """beside: what was measured just before this system's tests, for each result."""
        for test in tests:
            result = attempt(system, test.name, lambda: run(test))
            if result is None:
                continue
            result.settings.update(beside, round=round_)
            if test.prefill:
                result.settings["flops_per_token"] = peer_tests.prompt_flops_per_token(
                    config, test.prompt)
            print(f"{system} {test.name}: {result.tokens_per_s:.1f} {test.measures}",
                  flush=True)
            peer_results.append(result)
            write(settings, results, failures, ceiling, peer_results)

    def record(system: str, workload: Workload, run: Callable[[], RunResult],
               quantized: bool = False) -> None:
        def measured() -> RunResult:
            result = run()
            if not quantized:
                attach_roofline(result, workload, config, settings.dtype, ceiling)
            return result
        result = attempt(system, workload.name, measured)
        if result is None:
            return
        print(summary(result), flush=True)
        results.append(result)
        write(settings, results, failures, ceiling, peer_results)

    if "kvflow" in settings.systems:
        for quantization in settings.kvflow_quantizations:
            system = system_name("kvflow", quantization)
            # Loaded on first use, so that a format that fails to load fails its rows only.
            load = functools.cache(lambda: _load_kvflow(settings, quantization))

            def run_kvflow_format(workload: Workload) -> RunResult:
                llm, memory = load()
                result = run_kvflow(llm, workload)
                result.system = system
                result.settings["memory"] = memory
                return result

            for workload in workloads:
                record(system, workload, lambda: run_kvflow_format(workload),
                       quantization not in UNQUANTIZED)
            load.cache_clear()
            gc.collect()  # this format's engine is gone before the next one's RSS is read
    hf_systems = [s for s in settings.systems if s.startswith("transformers")]
    if hf_systems:
        torch.set_num_threads(settings.threads)  # as an engine's governor may have left it
        hf_model = load_hf_model(settings.model, dtype)
        for workload in workloads:
            if "transformers-one" in hf_systems:
                covered = workload.prefix(settings.hf_one_at_a_time_requests)
                record("transformers-one", workload,
                       lambda: run_transformers(hf_model, covered, 1))
            if "transformers-batch" in hf_systems and not workload.single_stream:
                record("transformers-batch", workload,
                       lambda: run_transformers(hf_model, workload, settings.hf_batch_size))
        del hf_model
    if "llama.cpp" in settings.systems:
        bf16 = functools.cache(lambda: llama_cpp.convert_to_gguf(settings.model))
        for ftype in settings.llama_cpp_types:
            system = system_name("llama.cpp", ftype)
            gguf = functools.cache(lambda: llama_cpp.quantize_gguf(bf16(), ftype))
            for workload in workloads:
                record(system, workload,
                       lambda: _llama_cpp(settings, workload, gguf(), system),
                       ftype not in UNQUANTIZED)
    if tests:
        _peer_rounds(settings, record_tests)
    write(settings, results, failures, ceiling, peer_results)
    return results


def _peer_rounds(settings: CompareSettings,
                 record_tests: Callable[[str, int, Callable, dict], None]) -> None:
    """The peer tests, kvflow's formats and llama.cpp's files in pairs (the first format
    beside the first file, and so on), each pair's tests back to back, in peer_rounds
    rounds: the machine's speed drifts over minutes, and a ratio is only as good as the
    time between its two sides. Before each side's tests, the DRAM read rate is measured
    where a decode test is among them, and the matmul rate in the run's dtype where a
    prefill test is, as that side's rooflines."""
    tests = [peer_tests.PeerTest.parse(t) for t in settings.peer_tests]
    decode = any(t.decode for t in tests)
    prefill = any(t.prefill for t in tests)

    def beside() -> dict:
        torch.set_num_threads(settings.threads)  # as an engine's governor may have left it
        measured = {}
        if decode:
            measured["read_ceiling_bytes_per_s"] = hardware.read_rate()
        if prefill:
            measured["matmul_ceiling_flops_per_s"] = hardware.matmul_flops(
                dtype=getattr(torch, settings.dtype))
        return measured

    kvflow = [("kvflow", q) for q in settings.kvflow_quantizations
              if "kvflow" in settings.systems]
    peer = [("llama.cpp", t) for t in settings.llama_cpp_types
            if "llama.cpp" in settings.systems]
    order = [side for pair in itertools.zip_longest(kvflow, peer) for side in pair if side]
    bf16 = functools.cache(lambda: llama_cpp.convert_to_gguf(settings.model))
    gguf = functools.cache(lambda ftype: llama_cpp.quantize_gguf(bf16(), ftype))
    repetitions, threads = settings.peer_repetitions, settings.threads
    for round_ in range(settings.peer_rounds):
        for system, weights in order:
            name = system_name(system, weights)
            if system == "kvflow":
                load = functools.cache(lambda: _load_kvflow(settings, weights)[0])
                record_tests(name, round_, lambda test: peer_tests.run_kvflow(
                    load(), test, repetitions, name), beside())
                load.cache_clear()
                gc.collect()
            else:
                record_tests(name, round_, lambda test: peer_tests.run_llama_cpp(
                    test, gguf(weights), threads, repetitions, name), beside())


def write(settings: CompareSettings, results: list[RunResult], failures: list[dict],
          ceiling: dict, peer_results: list[peer_tests.PeerTestResult]) -> None:
    import transformers

    settings.out.parent.mkdir(parents=True, exist_ok=True)
    machine = hardware.inventory()
    document = {"date": time.strftime("%Y-%m-%d"), "model": str(settings.model),
                "machine": machine, "ceilings": ceiling,
                "versions": {"torch": torch.__version__,
                             "transformers": transformers.__version__,
                             "llama-cpp-python": llama_cpp.LLAMA_CPP_PYTHON},
                "results": [r.to_dict() for r in results],
                "peer_tests": [r.to_dict() for r in peer_results], "failures": failures}
    settings.out.with_name(settings.out.name + ".json").write_text(json.dumps(document, indent=1))
    failed = "".join(f"\n{f['system']} failed on {f['workload']}: {f['error']}\n"
                     for f in failures)
    memory = memory_table(results)
    isa = " ".join(flag for flag, present in machine["isa"].items() if present)
    tests = (f"\nllama.cpp's own benchmarks, on {machine['cpu']} ({machine['cpu_id']}; "
             f"{isa}), {settings.threads} threads:\n\n{peer_tests.peer_table(peer_results)}\n"
             if peer_results else "")
    settings.out.with_name(settings.out.name + ".md").write_text(
        (markdown_table(results) + "\n" if results else "")
        + (f"\n{memory}\n" if memory else "") + tests + failed)
    try:
        plot(results, settings.out)
    except ImportError:
        logger.warning("no plots: matplotlib is not installed (pip install 'kvflow[bench]')")
