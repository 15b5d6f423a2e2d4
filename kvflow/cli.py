"""`kvflow generate`: one completion from the command line."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from kvflow.engine.args import EngineArgs


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field (--max-model-len for max_model_len, and so on)."""
    defaults = EngineArgs(model="")
    kinds = {"max_model_len": int, "block_size": int, "max_num_seqs": int,
             "max_num_batched_tokens": int, "seed": int}
    for field in dataclasses.fields(EngineArgs):
        if field.name == "model":
            continue
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name,
                            type=kinds.get(field.name, str),
                            default=getattr(defaults, field.name))


def engine_args_from(namespace: argparse.Namespace) -> EngineArgs:
    names = {field.name for field in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{k: v for k, v in vars(namespace).items() if k in names})


def _generate(ns: argparse.Namespace) -> int:
    from kvflow import LLM, SamplingParams

    params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            min_p=ns.min_p, max_tokens=ns.max_tokens, seed=ns.sample_seed,
                            stop=ns.stop or None, repetition_penalty=ns.repetition_penalty,
                            ignore_eos=ns.ignore_eos)
    args = engine_args_from(ns)
    llm = LLM(**dataclasses.asdict(args))
    output = llm.generate(ns.prompt, params, use_tqdm=False)[0]
    print(output.outputs[0].text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvflow")
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="print the completion of one prompt")
    generate.add_argument("model")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--min-p", type=float, default=0.0)
    generate.add_argument("--repetition-penalty", type=float, default=1.0)
    generate.add_argument("--sample-seed", type=int, default=None,
                          help="seed of this request's sampling (--seed seeds the engine)")
    generate.add_argument("--stop", action="append", help="a stop string; may repeat")
    generate.add_argument("--ignore-eos", action="store_true")
    add_engine_arguments(generate)
    generate.set_defaults(handler=_generate)

    ns = parser.parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.handler(ns)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
