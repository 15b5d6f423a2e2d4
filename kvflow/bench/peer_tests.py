"""llama.cpp's own benchmarks, and kvflow measured the same way on the same weights.

llama.cpp is at its best in its own tools, not behind llama-server: `llama-bench` for one
stream and `llama-batched-bench` for a batch. The tests, named as those tools print them:
- pp<P>: a prompt of P tokens in one batch, from an empty cache; prompt tokens/s;
- tg<N>: N tokens generated one at a time from an empty cache; generated tokens/s;
- pp<P>+tg<N>x<S>: S sequences of P prompt tokens and N generated tokens each, all at
  once (llama-batched-bench's PP, TG and PL); all S x (P + N) tokens per second of the whole.
Each runs `repetitions` times; the median is kept, with every sample.
`kvflow bench compare --peer-tests` runs them beside its workloads."""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kvflow.bench import llama_cpp


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


def run_llama_cpp(test: PeerTest, gguf: Path, threads: int, repetitions: int,
                  system: str) -> PeerTestResult:
    """The test in llama.cpp's own tool, built beside llama-server."""
    llama_cpp.ensure_llama_server()
    if test.batched:
        binary = llama_cpp.build_dir() / "bin" / "llama-batched-bench"
        context = test.sequences * (test.prompt + test.generate) + 64
        command = [str(binary), "-m", str(gguf), "-t", str(threads), "-npp", str(test.prompt),
                   "-ntg", str(test.generate), "-npl", str(test.sequences), "-c", str(context),
                   "--output-format", "jsonl"]
        samples = [parse_batched_bench(_output(command)) for _ in range(repetitions)]
    else:
        binary = llama_cpp.build_dir() / "bin" / "llama-bench"
        command = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(test.prompt),
                   "-n", str(test.generate), "-r", str(repetitions), "-o", "json"]
        samples = parse_llama_bench(_output(command))
    return PeerTestResult(system, test.name, statistics.median(samples), samples,
                          {"command": command[0].rsplit("/", 1)[-1:] + command[1:],
                           "build": llama_cpp.build_dir().name})


def _output(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} exited with {done.returncode}: "
                           f"{done.stderr[-2000:]}")
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
    return PeerTestResult(system, test.name, statistics.median(samples), samples,
                          {"max_num_seqs": config.max_num_seqs,
                           "max_num_batched_tokens": config.max_num_batched_tokens})


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
    return "\n".join(lines)
