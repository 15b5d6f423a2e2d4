"""Reports: the roofline of a run, a text summary, the comparison table and its plots."""
from __future__ import annotations

import json
from pathlib import Path

from kvflow.bench import hardware
from kvflow.bench.results import RunResult
from kvflow.bench.roofline import ModelCost, roofline, run_cost
from kvflow.bench.workload import Workload

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def model_config(model: str | Path) -> dict:
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        raise ValueError(f"{path.name} is a GGUF file, whose weights keep their own formats; "
                         "the roofline counts a checkpoint's dtype")
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"no config.json at {model}: the roofline needs the model's shape")
    return json.loads(path.read_text())


def attach_roofline(result: RunResult, workload: Workload, config: dict, dtype: str,
                    ceiling: dict) -> None:
    """The workload's schedule (one at a time, or all at once) over the requests that
    completed, on this machine's ceilings."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"no roofline for dtype {dtype!r}; have {sorted(DTYPE_BYTES)}")
    if result.num_requests == 0:
        return
    cost = ModelCost.from_config(config, DTYPE_BYTES[dtype])
    lengths = (result.settings.get("completed_lengths")
               or workload.prefix(result.num_requests).lengths)
    concurrency = 1 if workload.single_stream else len(lengths)
    work = run_cost(cost, lengths, concurrency, workload.shared_prefix_len)
    line = roofline(work, result.seconds,
                    hardware.matmul_rate(ceiling, dtype), ceiling["dram_read_bytes_per_s"])
    result.roofline = {**line.to_dict(), "dtype": dtype, "concurrency": concurrency,
                       "threads": ceiling["threads"], "device": ceiling["device"]}


def summary(result: RunResult) -> str:
    d = result.to_dict()
    lines = [f"{result.system} on {result.workload}: {result.num_requests} requests in "
             f"{result.seconds:.2f} s",
             f"  requests/s {d['requests_per_s']:.3f}; tokens/s: prompt "
             f"{d['prompt_tokens_per_s']:.1f}, generated {d['generated_tokens_per_s']:.1f}, "
             f"total {d['total_tokens_per_s']:.1f}"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        stats = result.latency.get(name)
        if stats:
            lines.append(f"  {name.upper():4s} ms: mean {stats['mean_ms']:.1f}, p50 "
                         f"{stats['p50_ms']:.1f}, p90 {stats['p90_ms']:.1f}, p99 "
                         f"{stats['p99_ms']:.1f}")
    if "goodput_requests_per_s" in result.latency:
        lines.append(f"  goodput {result.latency['goodput_requests_per_s']:.3f} requests/s "
                     f"within {result.latency['slo']}")
    if result.latency.get("failed"):
        lines.append(f"  failed: {result.latency['failed']} ({result.latency['errors']})")
    r = result.roofline
    if r:
        lines.append(f"  roofline: {r['binding']}-bound (compute {r['compute_seconds']:.2f} s at "
                     f"{r['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s, memory "
                     f"{r['memory_seconds']:.2f} s at {r['dram_bytes_per_s'] / 1e9:.1f} GB/s); "
                     f"achieved {r['achieved_percent']:.1f}% of the {r['binding']} ceiling")
    return "\n".join(lines)


def markdown_table(results: list[RunResult]) -> str:
    """One row per run. Decode tokens/s per stream is 1 / median TPOT: what one user sees
    after the first token, without the prompt's share that generated tokens/s includes."""
    rows = ["| workload | system | requests | generated tokens/s | total tokens/s | "
            "TTFT p50 | decode tokens/s per stream | % of roofline (bound) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        d = result.to_dict()
        ttft = result.latency.get("ttft", {}).get("p50_ms")
        tpot = result.latency.get("tpot", {}).get("p50_ms")
        r = result.roofline
        ttft_cell = f"{ttft:.0f} ms" if ttft is not None else "-"
        decode_cell = f"{1000 / tpot:.1f}" if tpot else "-"
        roof_cell = f"{r['achieved_percent']:.1f}% ({r['binding']})" if r else "-"
        rows.append(f"| {result.workload} | {result.system} | {result.num_requests} | "
                    f"{d['generated_tokens_per_s']:.1f} | {d['total_tokens_per_s']:.1f} | "
                    f"{ttft_cell} | {decode_cell} | {roof_cell} |")
    return "\n".join(rows)


def _mib(value: int | None) -> str:
    return f"{value / 2**20:,.0f}" if value is not None else "-"


def memory_table(results: list[RunResult]) -> str:
    """Per system and format, the first run's memory once loaded: the file it loaded, the
    weights it holds (kvflow's parameters; llama.cpp's model buffers), its KV cache (sized
    by the run's options: part of the resident set once written), and the process's
    resident set (anonymous + file-backed), in MiB; for kvflow, which loads in the process
    that measures, also what the load added to it. Empty when no run recorded memory."""
    seen: dict[str, dict] = {}
    for result in results:
        if "memory" in result.settings:
            seen.setdefault(result.system, result.settings["memory"])
    if not seen:
        return ""
    rows = ["| system | file | file MiB | weights MiB | KV cache MiB "
            "| RSS after load MiB (anon + file) | RSS added by the load MiB |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for system, memory in seen.items():
        rss, before = memory["rss_after_load"], memory.get("rss_before_load")
        added = rss["rss"] - before["rss"] if before else None
        rows.append(f"| {system} | {Path(memory['file']).name} | {_mib(memory['file_bytes'])} "
                    f"| {_mib(memory['weight_bytes'])} | {_mib(memory.get('kv_cache_bytes'))} "
                    f"| {_mib(rss['rss'])} "
                    f"({_mib(rss.get('rss_anon'))} + {_mib(rss.get('rss_file'))}) "
                    f"| {_mib(added)} |")
    return "\n".join(rows)


def _save(fig, out: Path, name: str) -> Path:  # noqa: ANN001
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out.with_name(f"{out.name}-{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: list[RunResult], out: Path) -> list[Path]:
    """Generated tokens/s and % of roofline per workload and system, throughput by
    concurrency where a system was tried at several, and the TTFT and ITL distributions
    of the runs that measured them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    if not results:
        return written
    workloads = list(dict.fromkeys(r.workload for r in results))
    systems = list(dict.fromkeys(r.system for r in results))
    for metric, label, name in (
            (lambda r: r.generated_tokens_per_s, "generated tokens/s", "throughput"),
            (lambda r: r.roofline.get("achieved_percent", 0), "% of roofline", "roofline")):
        fig, axes = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 3.5),
                                 squeeze=False)
        for ax, workload in zip(axes[0], workloads):
            runs = {r.system: r for r in results if r.workload == workload}
            ax.bar(range(len(systems)), [metric(runs[s]) if s in runs else 0 for s in systems])
            ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right", fontsize=7)
            ax.set_title(workload)
            ax.set_ylabel(label)
        written.append(_save(fig, out, name))
    swept = [r for r in results if r.settings.get("tried")]
    if swept:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in swept:
            points = sorted((int(k), v) for k, v in r.settings["tried"].items())
            ax.plot([p for p, _ in points], [v for _, v in points], marker="o",
                    label=f"{r.system} ({r.workload})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sequences")
        ax.set_ylabel("generated tokens/s")
        ax.legend(fontsize=6)
        written.append(_save(fig, out, "concurrency"))
    samples = [r for r in results if r.latency.get("ttft_samples_ms")]
    if samples:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for key, ax in zip(("ttft_samples_ms", "itl_samples_ms"), axes):
            for r in samples:
                values = sorted(r.latency.get(key) or [])
                if values:
                    ax.plot(values, [(i + 1) / len(values) for i in range(len(values))],
                            label=f"{r.system} ({r.workload})")
            ax.set_xscale("log")
            ax.set_xlabel(key.removesuffix("_samples_ms").upper() + " (ms)")
            ax.set_ylabel("fraction of samples")
            if ax.lines:
                ax.legend(fontsize=6)
        written.append(_save(fig, out, "latency"))
    return written
