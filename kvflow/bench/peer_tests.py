"""llama.cpp's own benchmarks, and kvflow measured the same way on the same weights.

llama.cpp is at its best in its own tools, not behind llama-server: `llama-bench` for one
stream and `llama-batched-bench` for a batch. The tests, named as those tools print them:
- pp<P>: a prompt of P tokens in one batch, from an empty cache; prompt tokens/s;
- tg<N>: N tokens generated one at a time from an empty cache; generated tokens/s;
- pp<P>+tg<N>x<S>: S sequences of P prompt tokens and N generated tokens each, all at
  once (llama-batched-bench's PP, TG and PL); all S x (P + N) tokens per second of the whole.
Each runs `repetitions` times; the median is kept, with every sample.
`kvflow bench compare --peer-tests` runs them beside its workloads.

A tg<N> result also records the weight bytes a generated token reads in that system's
format (`bytes_per_token`) and the DRAM read rate measured just before its system's tests
(`read_ceiling_bytes_per_s`): on a shared host that rate moves by half within minutes, so
a decode's share of the memory roofline is only meaningful against one measured beside it.
The KV cache a tg128 reads is left out (under a thousandth of the weights' bytes for a
0.5B model).

A pp<P> result likewise records the FLOPs a prompt token costs by the roofline's rules
(`flops_per_token`, kvflow/bench/roofline.py) and the matmul rate in the run's dtype
(bf16 by default) measured just before its system's tests (`matmul_ceiling_flops_per_s`),
for its share of the compute roofline."""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvflow.bench import llama_cpp
from kvflow.bench.roofline import ModelCost, run_cost


@dataclass(frozen=True)
class PeerTest:
    prompt: int
    generate: int
    sequences: int = 1

    @classmethod
    def parse(cls, text: str) -> PeerTest:
        batched = re.fullmatch(r"pp(\d+)\+tg(\d+)x(\d+)", text)
        single = re.fullmatch(r"(pp|tg)(\d+)", text)
        if batched:
            test = cls(int(batched[1]), int(batched[2]), int(batched[3]))
        elif single:
            count = int(single[2])
            test = cls(count, 0) if single[1] == "pp" else cls(0, count)
        else:
            raise ValueError(f"unknown peer test {text!r}: pp<P>, tg<N> or pp<P>+tg<N>x<S>, "
                             "as in pp512, tg128, pp256+tg64x16")
        if min(test.sequences, test.prompt + test.generate) < 1 or (
                test.batched and min(test.prompt, test.generate) < 1):
            raise ValueError(f"peer test {text!r} has nothing to measure")
        return test

    @property
    def batched(self) -> bool:
        return self.sequences > 1 or (self.prompt > 0 and self.generate > 0)

    @property
    def decode(self) -> bool:
        """tg<N>: measured against the read ceiling."""
        return not self.prompt

    @property
    def prefill(self) -> bool:
        """pp<P>: measured against the matmul ceiling."""
        return bool(self.prompt) and not self.batched

    @property
    def name(self) -> str:
        if self.batched:
            return f"pp{self.prompt}+tg{self.generate}x{self.sequences}"
        return f"pp{self.prompt}" if self.prompt else f"tg{self.generate}"

    @property
    def measures(self) -> str:
        if self.batched:
            return "all tokens/s"
        return "prompt tokens/s" if self.prompt else "generated tokens/s"


@dataclass
class PeerTestResult:
    system: str
    test: str
    tokens_per_s: float  # the median sample, as PeerTest.measures says
    samples: list[float]
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def weights_read_per_s(self) -> float | None:
        """The weight bytes a decode test read per second; None for other tests, or where
        its bytes per token were not recorded."""
        bytes_per_token = self.settings.get("bytes_per_token")
        if not bytes_per_token or not PeerTest.parse(self.test).decode:
            return None
        return self.tokens_per_s * bytes_per_token

    @property
    def read_share(self) -> float | None:
        """weights_read_per_s over the read ceiling measured beside the test; None where
        either is missing."""
        rate, ceiling = self.weights_read_per_s, self.settings.get("read_ceiling_bytes_per_s")
        return rate / ceiling if rate is not None and ceiling else None

    @property
    def flops_per_s(self) -> float | None:
        """The FLOPs a prefill test computed per second; None for other tests, or where its
        FLOPs per token were not recorded."""
        flops_per_token = self.settings.get("flops_per_token")
        if not flops_per_token or not PeerTest.parse(self.test).prefill:
            return None
        return self.tokens_per_s * flops_per_token

    @property
    def compute_share(self) -> float | None:
        """flops_per_s over the matmul ceiling measured beside the test; None where either
        is missing."""
        rate, ceiling = self.flops_per_s, self.settings.get("matmul_ceiling_flops_per_s")
        return rate / ceiling if rate is not None and ceiling else None


def prompt_flops_per_token(config: dict, prompt: int) -> float:
    """What a pp<prompt> test computes per prompt token, by the roofline's rules from the
    model's config.json: the prompt's tokens, causal attention over it, and the logits of
    its last token."""
    return run_cost(ModelCost.from_config(config), [(prompt, 1)], 1).flops / prompt


def gguf_decode_bytes(gguf: Path) -> int:
    """The bytes of a GGUF file's tensors one generated token reads: all but the token
    embedding (one row of it is gathered), which is read whole where it is also the output
    layer (a tied file has no output.weight); of expert tensors (`*_exps`), the share of
    experts a token uses."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)

    def field(name: str) -> int | None:
        value = reader.fields.get(name)
        return int(value.parts[value.data[0]][0]) if value is not None else None

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    experts, used = field(f"{arch}.expert_count"), field(f"{arch}.expert_used_count")
    names = {t.name for t in reader.tensors}
    total = 0.0
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight" and "output.weight" in names:
            continue
        share = used / experts if "_exps." in tensor.name and experts and used else 1.0
        total += int(tensor.n_bytes) * share
    return round(total)


def kvflow_decode_bytes(llm) -> int:  # noqa: ANN001
    """The bytes of the loaded model's tensors one generated token reads, in the format it
    was loaded in: every layer's but the embedding's (one row is gathered) and the rotary
    tables' (one row), the embedding whole where it is the LM head, and of the experts the
    share a token uses."""
    from kvflow.layers.moe import FusedMoE
    from kvflow.layers.rotary import RotaryEmbedding

    model = llm.engine.runner.model
    moe = llm.engine.model_config.moe
    expert_share = moe.top_k / moe.num_experts if moe else 1.0
    seen: set[int] = set()
    total = 0.0

    def count(tensor: torch.Tensor, share: float = 1.0) -> None:
        nonlocal total
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size() * share

    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, RotaryEmbedding)):
            continue
        share = expert_share if isinstance(module, FusedMoE) else 1.0
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            count(tensor, share)
    if getattr(model, "lm_head", None) is None and model.tied_head_weight is not None:
        count(model.tied_head_weight)
    return round(total)


def run_llama_cpp(test: PeerTest, gguf: Path, threads: int, repetitions: int,
                  system: str) -> PeerTestResult:
    """The test in llama.cpp's own tool, built beside llama-server: in its native build,
    or in the build without AMX where the native one crashed on it."""
    return llama_cpp.without_amx_if_crashed(
        lambda amx: _run_llama_cpp(test, gguf, threads, repetitions, system, amx))


def _run_llama_cpp(test: PeerTest, gguf: Path, threads: int, repetitions: int, system: str,
                   amx: bool) -> PeerTestResult:
    llama_cpp.ensure_llama_server(amx=amx)
    build = llama_cpp.build_dir(amx)
    if test.batched:
        binary = build / "bin" / "llama-batched-bench"
        context = test.sequences * (test.prompt + test.generate) + 64
        command = [str(binary), "-m", str(gguf), "-t", str(threads), "-npp", str(test.prompt),
                   "-ntg", str(test.generate), "-npl", str(test.sequences), "-c", str(context),
                   "--output-format", "jsonl"]
        samples = [parse_batched_bench(_output(command)) for _ in range(repetitions)]
    else:
        binary = build / "bin" / "llama-bench"
        command = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(test.prompt),
                   "-n", str(test.generate), "-r", str(repetitions), "-o", "json"]
        samples = parse_llama_bench(_output(command))
    settings = {"command": command[0].rsplit("/", 1)[-1:] + command[1:], "build": build.name}
    if test.decode:
        settings["bytes_per_token"] = gguf_decode_bytes(gguf)
    return PeerTestResult(system, test.name, statistics.median(samples), samples, settings)


def _output(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise llama_cpp.exit_error(Path(command[0]).name, done.returncode, done.stderr[-2000:])
    return done.stdout


def parse_llama_bench(stdout: str) -> list[float]:
    """llama-bench -o json: the samples of its one test, in tokens/s."""
    tests = json.loads(stdout)
    if len(tests) != 1:
        raise ValueError(f"expected one llama-bench test, got {len(tests)}")
    return [float(s) for s in tests[0]["samples_ts"]]


def parse_batched_bench(stdout: str) -> float:
    """llama-batched-bench --output-format jsonl: all tokens per second of its one run."""
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if len(rows) != 1:
        raise ValueError(f"expected one llama-batched-bench row, got {len(rows)}")
    return float(rows[0]["speed"])


def run_kvflow(llm, test: PeerTest, repetitions: int, system: str,  # noqa: ANN001
               seed: int = 0) -> PeerTestResult:
    """The test in kvflow's engine: greedy, ignore_eos, fresh random prompt ids for every
    run (so no run reuses another's cached prefix), after one untimed run."""
    from kvflow import SamplingParams

    vocab = llm.engine.model_config.vocab_size
    rng = np.random.default_rng(seed)

    def prompts() -> list[dict]:
        # tg<N> starts from an empty cache: one token in, as llama-bench's first step.
        length = max(1, test.prompt)
        return [{"prompt_token_ids": rng.integers(100, vocab - 100, length).tolist()}
                for _ in range(test.sequences)]

    # pp<P> generates the one token its prefill samples; tg<N>, N after the first.
    params = SamplingParams(temperature=0, ignore_eos=True,
                            max_tokens=test.generate + (0 if test.batched else 1))
    samples = []
    for run in range(repetitions + 1):
        start = time.perf_counter()
        outputs = llm.generate(prompts(), params, use_tqdm=False)
        seconds = time.perf_counter() - start
        if not run:
            continue
        if test.batched:
            samples.append(test.sequences * (test.prompt + test.generate) / seconds)
        elif test.prompt:
            m = outputs[0].metrics
            samples.append(test.prompt / (m.first_token_time - m.arrival_time))
        else:
            m = outputs[0].metrics
            samples.append(test.generate / (m.finished_time - m.first_token_time))
    config = llm.engine.scheduler_config
    settings = {"max_num_seqs": config.max_num_seqs,
                "max_num_batched_tokens": config.max_num_batched_tokens}
    if test.decode:
        settings["bytes_per_token"] = kvflow_decode_bytes(llm)
    return PeerTestResult(system, test.name, statistics.median(samples), samples, settings)


def peer_table(results: list[PeerTestResult]) -> str:
    """One row per test, one column per system: the median over rounds."""
    tests = list(dict.fromkeys(r.test for r in results))
    systems = list(dict.fromkeys(r.system for r in results))
    rounds: dict[tuple[str, str], list[float]] = {}
    for r in results:
        rounds.setdefault((r.system, r.test), []).append(r.tokens_per_s)
    by = {key: statistics.median(values) for key, values in rounds.items()}
    lines = ["| test | measures | " + " | ".join(systems) + " |",
             "| --- | --- |" + " --- |" * len(systems)]
    for test in tests:
        cells = [f"{by[(s, test)]:.1f}" if (s, test) in by else "-" for s in systems]
        lines.append(f"| {test} | {PeerTest.parse(test).measures} | " + " | ".join(cells) + " |")
    # A decode's share of the read ceiling, a prefill's of the matmul ceiling: the median
    # round's, with its rate.
    for label, share_of, rate_of, unit in [
            ("weights read (% of the read ceiling beside it)", "read_share",
             "weights_read_per_s", lambda rate: f"{rate / 1e9:.1f} GB/s"),
            ("computed (% of the matmul ceiling beside it)", "compute_share",
             "flops_per_s", lambda rate: f"{rate / 1e12:.3f} TFLOP/s")]:
        shares: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in results:
            if getattr(r, share_of) is not None:
                shares.setdefault((r.system, r.test), []).append(
                    (getattr(r, share_of), getattr(r, rate_of)))
        for test in tests:
            if not any((s, test) in shares for s in systems):
                continue
            cells = []
            for system in systems:
                rounds_ = sorted(shares.get((system, test), []))
                share, rate = rounds_[len(rounds_) // 2] if rounds_ else (None, None)
                cells.append("-" if share is None else f"{unit(rate)} ({100 * share:.0f}%)")
            lines.append(f"| {test} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
