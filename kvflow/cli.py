"""The kvflow command: `kvflow serve` (the OpenAI-compatible server), `kvflow generate`,
`kvflow bench ...` and `kvflow env`."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import TYPE_CHECKING

from kvflow.logger import configure_logging
from kvflow.vllm_compat import refusal

if TYPE_CHECKING:
    from kvflow.tokenizer.render_process import TemplateRenderer

# `kvflow generate`'s sampling flags and their defaults where neither the flag nor the
# model's generation config sets one.
_GENERATE_DEFAULTS = {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                      "min_p": 0.0, "repetition_penalty": 1.0}


def _generate(ns: argparse.Namespace) -> int:
    from kvflow import LLM, SamplingParams
    from kvflow.engine.args import EngineArgs

    args = EngineArgs.from_cli_args(ns)
    llm = LLM(**dataclasses.asdict(args))
    # The command's own defaults, then the model's (--generation-config), then the flags.
    given = {name: getattr(ns, name) for name in _GENERATE_DEFAULTS
             if getattr(ns, name) is not None}
    params = SamplingParams(**{**_GENERATE_DEFAULTS, **llm.generation_defaults, **given},
                            stop=ns.stop or None, ignore_eos=ns.ignore_eos)
    output = llm.generate(ns.prompt, params, use_tqdm=False)[0]
    print(output.outputs[0].text)
    return 0


def _serve(ns: argparse.Namespace, renderer: TemplateRenderer | None) -> int:
    from kvflow.models.config import ModelConfig
    from kvflow.models.gguf import is_gguf
    from kvflow.server.api_server import serve
    from kvflow.server.args import ServerArgs

    args = ServerArgs.from_cli_args(ns)
    if args.headless:
        from kvflow.executor.headless import run_headless

        if renderer is not None:
            renderer.close()
        return run_headless(args.engine)
    if is_gguf(args.engine.model):
        # The server loads its model after it binds; a GGUF file is read and checked (its
        # architecture, tensor types and shapes) first, so that a bad one ends the command
        # with its message instead of a server that answers 503.
        ModelConfig.from_pretrained(args.engine.model)
    serve(args, renderer)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    renderer = None
    if argv[:1] == ["serve"] and not {"-h", "--help"} & set(argv):
        from kvflow.tokenizer.render_process import TemplateRenderer
        from kvflow.worker.host_memory import keep_freed_blocks

        # Before any thread allocates: the server loads and steps its engine on threads,
        # which take their malloc arena then (on a GPU this only keeps host memory too).
        keep_freed_blocks()

        # The server renders chat templates in a worker process that imports transformers;
        # started now, that import runs on another core while this process imports torch
        # and the server, instead of after them, when the model's probe render waits on it.
        renderer = TemplateRenderer()
        renderer.prestart()
    from kvflow.engine.args import EngineArgs
    from kvflow.server.args import ServerArgs

    parser = argparse.ArgumentParser(prog="kvflow")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", parents=[common],
                                   help="print the completion of one prompt")
    generate.add_argument("model", nargs="?", default=None,
                          help="checkpoint directory, GGUF file or hub id (default: the built-in "
                               "demo model)")
    generate.add_argument("--prompt", required=True)
    for name, value in _GENERATE_DEFAULTS.items():
        generate.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                              help=f"default: the model's generation config, else {value}")
    generate.add_argument("--stop", action="append", help="a stop string; may repeat")
    generate.add_argument("--ignore-eos", action="store_true")
    EngineArgs.add_cli_args(generate)
    generate.set_defaults(handler=_generate)

    serve = commands.add_parser("serve", parents=[common],
                                help="run the OpenAI-compatible HTTP server",
                                description="Serve MODEL (a checkpoint directory, a Hugging "
                                            "Face hub id or a GGUF file; none: the built-in "
                                            "demo model) over HTTP: OpenAI's completions, chat "
                                            "completions and Responses APIs and Anthropic's "
                                            "Messages API.")
    ServerArgs.add_cli_args(serve)
    EngineArgs.add_cli_args(serve)
    serve.set_defaults(handler=functools.partial(_serve, renderer=renderer))

    from kvflow.bench.cli import add_commands

    add_commands(commands, common)

    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [arg for arg in unknown if arg.startswith("-")]
        why = refusal(flags[0]) if flags else None
        print(f"error: {why}" if why else
              f"error: unrecognized argument {(flags or unknown)[0]!r} "
              f"(`kvflow {ns.command} --help` lists the options)", file=sys.stderr)
        return 2
    configure_logging(ns.log_level.upper())
    try:
        return ns.handler(ns)
    except (ValueError, OSError) as exc:  # bad input, a missing file, a refused connection
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
