"""xgrammar against llguidance on kvflow's test schemas: compile time, per-token mask time,
and which unsupported schema features each refuses (issue 14's choice of grammar engine).

    .venv/bin/pip install xgrammar llguidance
    .venv/bin/python benchmarks/grammar_engines.py                  # the demo tokenizer
    .venv/bin/python benchmarks/grammar_engines.py --qwen-like      # a 151,665-token vocabulary

Each schema is compiled once (no cache hit is timed), then walked for up to --steps tokens:
at each step the engine fills the next-token bitmask (timed), and a token the mask allows is
drawn at random and accepted. Both engines get the same JSON layout: ", " and ": " between
items and no other whitespace. --qwen-like trains a byte-level BPE of Qwen2.5's 151,665
tokens on the standard library (about 30 s, cached), so that no download is needed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from kvflow.cache import cache_root
from kvflow.demo import demo_model_path, train_tokenizer

SCHEMAS = Path(__file__).resolve().parent.parent / "tests" / "data" / "json_schemas.json"
QWEN_VOCAB = 151_665  # tokens in Qwen2.5's tokenizer
QWEN_MODEL_VOCAB = 151_936  # rows of its embedding


def qwen_like_tokenizer():  # noqa: ANN201
    from transformers import AutoTokenizer

    path = cache_root() / "bench" / "qwen-like-tokenizer"
    if not (path / "tokenizer.json").is_file():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        texts = [f.read_text(encoding="utf-8", errors="replace")
                 for f in sorted(stdlib.rglob("*.py"))]
        train_tokenizer(texts, QWEN_VOCAB).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int) -> None:  # noqa: ANN001
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=2)

    def compile(self, schema: dict):  # noqa: ANN201
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        return self.xgr.GrammarMatcher(compiled)

    @staticmethod
    def fill(matcher, bitmask: torch.Tensor) -> None:  # noqa: ANN001
        matcher.fill_next_token_bitmask(bitmask)

    @staticmethod
    def accept(matcher, token: int) -> bool:  # noqa: ANN001
        return matcher.accept_token(token)

    @staticmethod
    def done(matcher) -> bool:  # noqa: ANN001
        return matcher.is_terminated()


class LLGuidance:
    name = "llguidance"
    OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def __init__(self, tokenizer, vocab_size: int) -> None:  # noqa: ANN001
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile(self, schema: dict):  # noqa: ANN201
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=self.OPTIONS)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    @staticmethod
    def fill(matcher, bitmask: torch.Tensor) -> None:  # noqa: ANN001
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    @staticmethod
    def accept(matcher, token: int) -> bool:  # noqa: ANN001
        return matcher.consume_token(token)

    @staticmethod
    def done(matcher) -> bool:  # noqa: ANN001
        return matcher.is_stopped()


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def run(engine, schemas: list[dict], vocab_size: int, steps: int, seed: int) -> dict:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    compile_s, mask_s = [], []
    bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    for entry in schemas:
        start = time.perf_counter()
        matcher = engine.compile(entry["schema"])
        compile_s.append(time.perf_counter() - start)
        for _ in range(steps):
            start = time.perf_counter()
            engine.fill(matcher, bitmask)
            mask_s.append(time.perf_counter() - start)
            token = int(rng.choice(allowed_tokens(bitmask, vocab_size)))
            assert engine.accept(matcher, token), (engine.name, entry["name"], token)
            if engine.done(matcher):
                break
    return {"compile": compile_s, "mask": mask_s}


def refusals(engine, schemas: list[dict]) -> list[str]:  # noqa: ANN001
    refused = []
    for entry in schemas:
        try:
            engine.compile(entry["schema"])
        except Exception:  # noqa: BLE001 - each engine raises its own type
            refused.append(entry["name"])
    return refused


def percentile_ms(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3 if q < 100 \
        else max(values) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qwen-like", action="store_true",
                        help="a 151,665-token BPE (model vocabulary 151,936)")
    parser.add_argument("--steps", type=int, default=64, help="tokens walked per schema")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", nargs="+", default=["xgrammar", "llguidance"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.qwen_like:
        tokenizer, vocab_size = qwen_like_tokenizer(), QWEN_MODEL_VOCAB
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
        vocab_size = json.loads((demo_model_path() / "config.json").read_text())["vocab_size"]
    data = json.loads(SCHEMAS.read_text())
    print(f"tokenizer: {len(tokenizer)} tokens, model vocabulary {vocab_size}; "
          f"{len(data['supported'])} schemas, {args.steps} steps each")
    for name in args.engines:
        start = time.perf_counter()
        engine = {"xgrammar": XGrammar, "llguidance": LLGuidance}[name](tokenizer, vocab_size)
        setup = time.perf_counter() - start
        times = run(engine, data["supported"], vocab_size, args.steps, args.seed)
        refused = refusals(engine, data["unsupported"])
        print(f"{name}: tokenizer setup {setup * 1e3:.0f} ms; compile p50 "
              f"{percentile_ms(times['compile'], 50):.2f} ms, p99 "
              f"{percentile_ms(times['compile'], 99):.2f} ms; mask p50 "
              f"{percentile_ms(times['mask'], 50) * 1e3:.0f} us, p99 "
              f"{percentile_ms(times['mask'], 99) * 1e3:.0f} us over {len(times['mask'])} "
              f"tokens; refuses {len(refused)}/{len(data['unsupported'])} unsupported "
              f"features: {', '.join(refused) or '-'}")


if __name__ == "__main__":
    main()
