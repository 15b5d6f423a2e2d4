"""The kvflow command: `kvflow serve` (the OpenAI-compatible server), `kvflow generate`,
`kvflow bench ...` and `kvflow env`."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from kvflow.config import parse_memory
from kvflow.engine.args import EngineArgs
from kvflow.logger import configure_logging


def _generate(ns: argparse.Namespace) -> int:
    from kvflow import LLM, SamplingParams

    params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            min_p=ns.min_p, max_tokens=ns.max_tokens,
                            stop=ns.stop or None, repetition_penalty=ns.repetition_penalty,
                            ignore_eos=ns.ignore_eos)
    args = EngineArgs.from_cli_args(ns)
    llm = LLM(**dataclasses.asdict(args))
    output = llm.generate(ns.prompt, params, use_tqdm=False)[0]
    print(output.outputs[0].text)
    return 0


def _serve(ns: argparse.Namespace) -> int:
    from kvflow.server.api_server import ServerArgs, serve

    if ns.max_waiting_requests is not None and ns.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests must be at least 1, got {ns.max_waiting_requests}")
    for flag in ("max_connections", "max_connections_per_client"):
        if getattr(ns, flag) is not None and getattr(ns, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, "
                             f"got {getattr(ns, flag)}")
    for flag in ("header_timeout", "body_timeout", "write_timeout"):
        if not getattr(ns, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, "
                             f"got {getattr(ns, flag)}")
    args = ServerArgs(engine=EngineArgs.from_cli_args(ns), host=ns.host, port=ns.port,
                      served_model_name=ns.served_model_name or [],
                      api_key=ns.api_key or os.environ.get("KVFLOW_API_KEY") or None,
                      max_waiting_requests=ns.max_waiting_requests,
                      shutdown_timeout=ns.shutdown_timeout,
                      enable_prompt_tokens_details=ns.enable_prompt_tokens_details,
                      max_request_body_bytes=parse_memory(ns.max_request_body_bytes,
                                                          "--max-request-body-bytes"),
                      max_connections=ns.max_connections,
                      max_connections_per_client=ns.max_connections_per_client,
                      header_timeout=ns.header_timeout,
                      body_timeout=ns.body_timeout, write_timeout=ns.write_timeout)
    serve(args, log_level=ns.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvflow")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", parents=[common],
                                   help="print the completion of one prompt")
    generate.add_argument("model", nargs="?", default=None,
                          help="checkpoint directory or hub id (default: the built-in demo model)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--min-p", type=float, default=0.0)
    generate.add_argument("--repetition-penalty", type=float, default=1.0)
    generate.add_argument("--stop", action="append", help="a stop string; may repeat")
    generate.add_argument("--ignore-eos", action="store_true")
    EngineArgs.add_cli_args(generate)
    generate.set_defaults(handler=_generate)

    serve = commands.add_parser("serve", parents=[common],
                                help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None,
                       help="checkpoint directory or hub id (default: the built-in demo model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="names clients may use in 'model' (default: MODEL as given; "
                            "/v1/models lists a local checkpoint by its directory's name)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (or set KVFLOW_API_KEY)")
    serve.add_argument("--max-waiting-requests", type=int, default=None,
                       help="sequences (prompts x n) that may wait for the engine; past it, "
                            "503 with Retry-After, and a request with more is a 400")
    serve.add_argument("--max-request-body-bytes", default="4MiB",
                       help="larger request bodies get a 413 before they are read (bytes or "
                            "e.g. 4MiB)")
    serve.add_argument("--max-connections", type=int, default=None,
                       help="open connections past which new ones get a 503 and are closed "
                            "(default: the open-file limit less 256, at most 4096)")
    serve.add_argument("--max-connections-per-client", type=int, default=None,
                       help="open connections from one client address past which its new "
                            "ones get a 503 (default: half of --max-connections)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a connection may take to send a request's headers; "
                            "idle and half-sent connections are closed after it")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a request's body may take to arrive after its headers "
                            "(408 after it)")
    serve.add_argument("--write-timeout", type=float, default=30.0,
                       help="seconds a client may leave a response unread before it is ended "
                            "and its request aborted")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="seconds running requests get to finish on SIGINT/SIGTERM")
    serve.add_argument("--enable-prompt-tokens-details", action="store_true",
                       help="report usage.prompt_tokens_details.cached_tokens (off by default: "
                            "it tells clients which prefixes are cached; see cache_salt)")
    EngineArgs.add_cli_args(serve)
    serve.set_defaults(handler=_serve)

    from kvflow.bench.cli import add_commands

    add_commands(commands, common)

    ns = parser.parse_args(argv)
    configure_logging(ns.log_level.upper())
    try:
        return ns.handler(ns)
    except (ValueError, OSError) as exc:  # bad input, a missing file, a refused connection
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
