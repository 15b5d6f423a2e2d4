"""The `kvflow bench ...` subcommands and `kvflow env`."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
from pathlib import Path

from kvflow.worker.threads import configure_threads


def _write_json(path: Path | None, document: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=1))


def _set_threads(ns: argparse.Namespace) -> None:
    """Every system in a run gets the same count: --threads, else one per physical core."""
    if ns.threads is not None and ns.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {ns.threads}")
    count = configure_threads(ns.threads)
    if hasattr(ns, "num_threads") and ns.num_threads is None:
        ns.num_threads = count


def _model_path(ns: argparse.Namespace) -> str:
    from kvflow.demo import demo_model_path

    return ns.model if ns.model is not None else str(demo_model_path())


def _llm(ns: argparse.Namespace):  # noqa: ANN202
    from kvflow import LLM
    from kvflow.engine.args import EngineArgs

    return LLM(**dataclasses.asdict(EngineArgs.from_cli_args(ns)))


def _quantized(llm) -> bool:  # noqa: ANN001
    """Whether the engine holds quantized weights (int8, int4, GGUF, GPTQ/AWQ or an int8 LM
    head), which the roofline, counting every weight in the run's dtype, does not model."""
    import torch

    return any(p.dtype in (torch.int8, torch.uint8)
               for p in llm.engine.runner.model.parameters())


def _finish(result, workload, model: str | None, dtype: str,  # noqa: ANN001
            out: Path | None, quantized: bool = False) -> None:
    """Attach the roofline where the model's config is known and its weights are in the
    run's dtype, print, and write."""
    from kvflow.bench import hardware
    from kvflow.bench.report import attach_roofline, model_config, summary

    device = result.settings.get("device", "cpu")
    if model is None:
        print("no roofline: give --model-path for the served model's config.json")
    elif quantized:
        print(f"no roofline: the weights are quantized, and the roofline counts them in {dtype}")
    else:
        try:
            attach_roofline(result, workload, model_config(model), dtype,
                            hardware.ceilings(device))
        except ValueError as exc:
            print(f"no roofline: {exc}")
    print(summary(result))
    _write_json(out, result.to_dict())


def _make_model(ns: argparse.Namespace) -> int:
    from kvflow.bench.make_model import make_model

    print(make_model(ns.shape, ns.out, seed=ns.seed))
    return 0


def _throughput(ns: argparse.Namespace) -> int:
    from kvflow.bench.make_model import tokenizer_vocab_size
    from kvflow.bench.offline import run_kvflow
    from kvflow.bench.workload import load_workload

    _set_threads(ns)
    ns.model = _model_path(ns)
    workload = load_workload(ns.workload, tokenizer_vocab_size(ns.model)).prefix(ns.num_requests)
    llm = _llm(ns)
    result = run_kvflow(llm, workload, use_tqdm=True,
                        structured_fraction=ns.structured_output_fraction)
    result.settings["device"] = llm.engine.device.type
    _finish(result, workload, ns.model, result.settings["dtype"], ns.output, _quantized(llm))
    return 0


def _latency(ns: argparse.Namespace) -> int:
    from kvflow.bench.make_model import tokenizer_vocab_size
    from kvflow.bench.offline import latency_summary, run_kvflow
    from kvflow.bench.workload import workload_from_spec

    _set_threads(ns)
    ns.model = _model_path(ns)
    spec = {"name": "latency", "seed": ns.prompt_seed, "num_requests": ns.num_iters,
            "prompt_len": {"uniform": [ns.prompt_len, ns.prompt_len]},
            "output_len": {"uniform": [ns.output_len, ns.output_len]}, "single_stream": True}
    workload = workload_from_spec(spec, tokenizer_vocab_size(ns.model))
    llm = _llm(ns)
    result = run_kvflow(llm, workload)
    result.settings["device"] = llm.engine.device.type
    _finish(result, workload, ns.model, result.settings["dtype"], ns.output, _quantized(llm))
    print(latency_summary(result))
    return 0


async def _served_model(base_url: str, api_key: str | None) -> str:
    import httpx

    from kvflow.bench.serve_client import served_model

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                 timeout=30) as client:
        return await served_model(client)


def _serve(ns: argparse.Namespace) -> int:
    from kvflow.bench.make_model import tokenizer_vocab_size
    from kvflow.bench.serve_client import LoadSettings, run_serve
    from kvflow.bench.workload import load_workload

    settings = LoadSettings(request_rate=ns.request_rate, max_concurrency=ns.max_concurrency,
                            timeout_s=ns.timeout, seed=ns.seed, slo_ttft_ms=ns.slo_ttft_ms,
                            slo_tpot_ms=ns.slo_tpot_ms, api_key=ns.api_key)
    model_path = ns.model_path
    served = ns.model
    if model_path is None:
        if served is None:
            served = asyncio.run(_served_model(ns.base_url, ns.api_key))
        if (Path(served) / "config.json").is_file():
            model_path = served
    if ns.vocab_size is None and model_path is None:
        raise ValueError("the served model is not a local checkpoint: give --model-path (its "
                         "tokenizer draws the prompt ids and its config.json sets the roofline) "
                         "or --vocab-size")
    vocab = ns.vocab_size if ns.vocab_size is not None else tokenizer_vocab_size(model_path)
    workload = load_workload(ns.workload, vocab).prefix(ns.num_requests)
    result = run_serve(ns.base_url, workload, settings, model=served, system=ns.system_name)
    result.settings["device"] = ns.device
    _finish(result, workload, model_path, ns.dtype, ns.output)
    return 0


def _compare(ns: argparse.Namespace) -> int:
    from kvflow.bench.compare import CompareSettings, compare

    _set_threads(ns)
    compare(CompareSettings(model=Path(_model_path(ns)), workloads=ns.workloads, out=ns.out,
                            systems=ns.systems, hf_one_at_a_time_requests=ns.hf_one_requests,
                            hf_batch_size=ns.hf_batch_size,
                            llama_cpp_parallel=ns.llama_cpp_parallel,
                            kv_cache_memory=ns.kv_cache_memory,
                            kvflow_quantizations=ns.kvflow_quantizations,
                            llama_cpp_types=ns.llama_cpp_types, peer_tests=ns.peer_tests,
                            peer_repetitions=ns.peer_repetitions,
                            peer_rounds=ns.peer_rounds))
    return 0


def _env(ns: argparse.Namespace) -> int:
    from kvflow.bench import hardware

    _set_threads(ns)
    info = hardware.inventory()
    info["threads_now"] = hardware.threads_now(info["torch_threads"])
    ceiling = hardware.ceilings(ns.device, refresh=ns.refresh)
    if ns.json:
        print(json.dumps({"inventory": info, "ceilings": ceiling}, indent=1))
    else:
        print(hardware.format_env(info, ceiling))
    return 0


def _rate(value: str) -> float:
    return math.inf if value == "inf" else float(value)


def add_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from kvflow.bench.compare import KVFLOW_QUANTIZATIONS, SYSTEMS
    from kvflow.bench.llama_cpp import GGUF_TYPES
    from kvflow.engine.args import EngineArgs

    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, default=None,
                         help="CPU threads for every system (default: one per physical core)")
    env = commands.add_parser("env", parents=[common, threads],
                              help="hardware inventory and measured roofline ceilings")
    env.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    env.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    env.add_argument("--json", action="store_true")
    env.set_defaults(handler=_env)

    bench = commands.add_parser("bench", help="benchmarks: make-model, throughput, serve, "
                                "latency, compare")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--output", type=Path, default=None, help="write the result as JSON")

    make = sub.add_parser("make-model", parents=[common],
                          help="a random-weight bf16 checkpoint of a model shape")
    make.add_argument("shape", help="a name from shared/model-shapes or a config.json path")
    make.add_argument("out", type=Path)
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(handler=_make_model)

    for name, handler, about in (("throughput", _throughput, "offline, engine in process"),
                                 ("latency", _latency, "single-stream TTFT and decode tokens/s")):
        p = sub.add_parser(name, parents=[common, threads, output], help=about)
        p.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
        if name == "throughput":
            p.add_argument("--workload", required=True,
                           help="a workload file or a name from shared/workloads")
            p.add_argument("--num-requests", type=int, default=None,
                           help="run only the first N requests")
            p.add_argument("--structured-output-fraction", type=float, default=0.0,
                           help="constrain this share of the requests to a JSON schema")
        else:
            p.add_argument("--prompt-len", type=int, default=128)
            p.add_argument("--output-len", type=int, default=256)
            p.add_argument("--num-iters", type=int, default=4)
            p.add_argument("--prompt-seed", type=int, default=0,
                           help="seed of the random prompt ids")
        EngineArgs.add_cli_args(p)
        p.set_defaults(handler=handler)

    serve = sub.add_parser("serve", parents=[common, output],
                           help="online load generator for any OpenAI-compatible server")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000")
    serve.add_argument("--workload", required=True)
    serve.add_argument("--request-rate", type=_rate, default=math.inf,
                       help="Poisson arrivals per second, or inf (all at once)")
    serve.add_argument("--max-concurrency", type=int, default=None)
    serve.add_argument("--num-requests", type=int, default=None)
    serve.add_argument("--timeout", type=float, default=600.0,
                       help="seconds for the whole run; unfinished requests count as failed")
    serve.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    serve.add_argument("--slo-ttft-ms", type=float, default=None)
    serve.add_argument("--slo-tpot-ms", type=float, default=None)
    serve.add_argument("--model", default=None, help="model name to request (default: the "
                       "server's first)")
    serve.add_argument("--model-path", default=None,
                       help="the served checkpoint, for its tokenizer and roofline")
    serve.add_argument("--vocab-size", type=int, default=None)
    serve.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                       help="the served weights' dtype, for the roofline")
    serve.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                       help="where the server runs, for the roofline's ceilings (measured here)")
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--system-name", default="server", help="label in the report")
    serve.set_defaults(handler=_serve)

    compare = sub.add_parser("compare", parents=[common, threads],
                             help="kvflow and its peers on the same requests, one table")
    compare.add_argument("--model", default=None)
    compare.add_argument("--workloads", nargs="+", default=[],
                         help="workload files or names from shared/workloads")
    compare.add_argument("--out", type=Path, required=True,
                         help="path prefix of the .json, .md and .png files")
    compare.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    compare.add_argument("--hf-one-requests", type=int, default=8,
                         help="transformers one-at-a-time runs only this prefix")
    compare.add_argument("--hf-batch-size", type=int, default=32)
    compare.add_argument("--llama-cpp-parallel", type=int, nargs="+", default=[8, 32])
    compare.add_argument("--kv-cache-memory", default=None)
    compare.add_argument("--kvflow-quantizations", nargs="+", default=["bf16"],
                         choices=list(KVFLOW_QUANTIZATIONS),
                         help="kvflow's weights: the checkpoint's, or quantized at load "
                         "(--quantization); +head: the LM head in int8 too "
                         "(--quantize-lm-head); one row per format")
    compare.add_argument("--llama-cpp-types", nargs="+", default=["BF16"], choices=GGUF_TYPES,
                         help="llama.cpp's GGUF files: the converted bf16 one, and what "
                         "llama-quantize makes of it; one row per type")
    compare.add_argument("--peer-tests", nargs="+", default=[],
                         help="llama.cpp's own benchmarks, and kvflow measured alike: pp<P> "
                         "(prefill, llama-bench -p), tg<N> (decode, llama-bench -n), "
                         "pp<P>+tg<N>x<S> (S sequences at once, llama-batched-bench)")
    compare.add_argument("--peer-repetitions", type=int, default=3,
                         help="runs of each peer test within a round; their median is kept")
    compare.add_argument("--peer-rounds", type=int, default=1,
                         help="rounds of every peer test, kvflow's formats and llama.cpp's "
                         "files alternating in pairs; the table gives the median round")
    compare.set_defaults(handler=_compare)
