"""`kvflow serve`'s own options (the engine's are EngineArgs'), with vLLM's spellings where
vLLM has the option, defined beside the dataclass as EngineArgs does."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvflow.config import parse_memory
from kvflow.demo import DEMO_MODEL_NAME, demo_model_path
from kvflow.engine.args import EngineArgs
from kvflow.engine.router import ROUTING_POLICIES, RoutingConfig
from kvflow.server.metrics import METRIC_PREFIXES
from kvflow.server.reasoning_parsers import reasoning_parser_names
from kvflow.server.response_store import DEFAULT_MAX_STORED_RESPONSES
from kvflow.server.tool_parsers import tool_parser_names
from kvflow.tokenizer.chat import load_chat_template

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServerArgs:
    engine: EngineArgs
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: list[str] = field(default_factory=list)
    api_key: list[str] = field(default_factory=list)  # any of them is accepted
    open_monitoring: bool = False  # /metrics, /load and /ping need no key
    max_waiting_requests: int | None = None  # sequences (prompts x n) waiting to run
    shutdown_timeout: float = 10.0
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_connections: int | None = None  # None: from the open-file limit
    max_connections_per_client: int | None = None  # None: half of max_connections
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    write_timeout: float = 30.0
    # Off by default, as in vLLM: cached_tokens tells a client whether a prefix is in the
    # cache, which across tenants that share it (no cache_salt) says what others sent.
    enable_prompt_tokens_details: bool = False
    enable_log_requests: bool = False
    response_role: str = "assistant"
    uvicorn_log_level: str = "info"
    disable_uvicorn_access_log: bool = False
    disable_fastapi_docs: bool = False  # no /docs, /redoc or /openapi.json
    disable_web_ui: bool = False  # no chat at /, no /dashboard
    headless: bool = False  # this machine's ranks only, no API server (kvflow/executor/headless.py)
    # CORS is off unless origins are given: a server on localhost that answered any web
    # page's requests could be driven by any site its user visits.
    allowed_origins: list[str] = field(default_factory=list)
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    metrics_prefix: str = "kvflow"  # or "vllm", for dashboards that read vllm: series
    stream_keepalive: float = 10.0  # seconds without output after which a stream gets a comment
    chat_template: str | None = None  # the template's text; None: the tokenizer's
    enable_auto_tool_choice: bool = False  # tool_choice "auto", parsed by tool_call_parser
    tool_call_parser: str | None = None  # a name in server/tool_parsers
    reasoning_parser: str | None = None  # a name in server/reasoning_parsers
    max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES  # /v1/responses kept in memory
    # Which engine core answers a request, with --data-parallel-size above 1.
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def __post_init__(self) -> None:
        if self.max_stored_responses < 0:
            raise ValueError(f"--max-stored-responses must be at least 0, "
                             f"got {self.max_stored_responses}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError(f"--max-waiting-requests must be at least 1, "
                             f"got {self.max_waiting_requests}")
        for name in ("max_connections", "max_connections_per_client"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                                 f"got {getattr(self, name)}")
        for name in ("header_timeout", "body_timeout", "write_timeout", "stream_keepalive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, "
                                 f"got {getattr(self, name)}")
        if self.uvicorn_log_level not in LOG_LEVELS:
            raise ValueError(f"--uvicorn-log-level must be one of {LOG_LEVELS}, "
                             f"got {self.uvicorn_log_level!r}")
        if self.metrics_prefix not in METRIC_PREFIXES:
            raise ValueError(f"--metrics-prefix must be one of {METRIC_PREFIXES}, "
                             f"got {self.metrics_prefix!r}")
        if not self.response_role:
            raise ValueError("--response-role must not be empty")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                             f"{', '.join(tool_parser_names())}) to read the model's calls")
        if self.tool_call_parser is not None and self.tool_call_parser not in \
                tool_parser_names():
            raise ValueError(f"--tool-call-parser must be one of "
                             f"{', '.join(tool_parser_names())}, got {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in \
                reasoning_parser_names():
            raise ValueError(f"--reasoning-parser must be one of "
                             f"{', '.join(reasoning_parser_names())}, "
                             f"got {self.reasoning_parser!r}")

    @property
    def model_names(self) -> list[str]:
        """The names the server lists and labels its metrics with. A local checkpoint is
        known by its directory's name: its absolute path says how the host is laid out."""
        if self.served_model_name:
            return self.served_model_name
        if Path(self.engine.model) == demo_model_path():
            return [DEMO_MODEL_NAME]
        local = Path(self.engine.model).expanduser()
        return [local.resolve().name if local.exists() else self.engine.model]

    def serves(self, name: str) -> bool:
        # The model argument itself is accepted too, as vLLM's default name, unlisted.
        return name in self.model_names or (not self.served_model_name
                                            and name == self.engine.model)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                            help="a checkpoint directory (config.json, *.safetensors and the "
                                 "tokenizer's files), a Hugging Face hub id (org/name, "
                                 "downloaded to the hub cache; see --revision, --download-dir) "
                                 "or a GGUF file (model.gguf, llama.cpp's format); none: the "
                                 "built-in demo model")
        parser.add_argument("--model", default=None, help="the same as MODEL (vLLM's spelling)")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--served-model-name", nargs="+", default=None,
                            help="names clients may use in 'model' (default: MODEL as given; "
                                 "/v1/models lists a local checkpoint by its directory's name)")
        parser.add_argument("--api-key", nargs="+", default=None,
                            help="require 'Authorization: Bearer KEY' with any of these keys "
                                 "(or set KVFLOW_API_KEY) on every route but /health and "
                                 "/version")
        parser.add_argument("--open-monitoring", action="store_true",
                            help="with --api-key, serve /metrics, /load and /ping without the "
                                 "key too, for scrapers and load balancers (/metrics' prefix "
                                 "cache counters tell whether someone sent a given prompt)")
        parser.add_argument("--max-waiting-requests", type=int, default=None,
                            help="sequences (prompts x n) that may wait for the engine; past "
                                 "it, 503 with Retry-After, and a request with more is a 400")
        parser.add_argument("--max-request-body-bytes", default="4MiB",
                            help="larger request bodies get a 413 before they are read (bytes "
                                 "or e.g. 4MiB)")
        parser.add_argument("--max-connections", type=int, default=None,
                            help="open connections past which new ones get a 503 and are "
                                 "closed (default: the open-file limit less 256, at most 4096)")
        parser.add_argument("--max-connections-per-client", type=int, default=None,
                            help="open connections from one client address past which its "
                                 "new ones get a 503 (default: half of --max-connections)")
        parser.add_argument("--header-timeout", type=float, default=10.0,
                            help="seconds a connection may take to send a request's headers; "
                                 "idle and half-sent connections are closed after it")
        parser.add_argument("--body-timeout", type=float, default=30.0,
                            help="seconds a request's body may take to arrive after its "
                                 "headers (408 after it)")
        parser.add_argument("--write-timeout", type=float, default=30.0,
                            help="seconds a client may leave a response unread before it is "
                                 "ended and its request aborted")
        parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                            help="seconds running requests get to finish on SIGINT/SIGTERM")
        parser.add_argument("--enable-prompt-tokens-details", action="store_true",
                            help="report usage.prompt_tokens_details.cached_tokens (off by "
                                 "default: it tells clients which prefixes are cached; see "
                                 "cache_salt)")
        logging = parser.add_mutually_exclusive_group()
        logging.add_argument("--enable-log-requests", action="store_true",
                             help="log each request's id, prompt length and sampling "
                                  "parameters (never its text)")
        logging.add_argument("--disable-log-requests", dest="enable_log_requests",
                             action="store_false",
                             help="the default: requests are not logged (vLLM's older flag)")
        parser.add_argument("--response-role", default="assistant",
                            help="the role of chat completion messages")
        parser.add_argument("--uvicorn-log-level", default="info", choices=LOG_LEVELS,
                            help="uvicorn's own log level (kvflow's is --log-level)")
        parser.add_argument("--disable-uvicorn-access-log", action="store_true",
                            help="no line per HTTP request in uvicorn's access log")
        parser.add_argument("--disable-fastapi-docs", action="store_true",
                            help="serve no OpenAPI schema (/openapi.json) and no /docs or "
                                 "/redoc pages")
        parser.add_argument("--disable-web-ui", action="store_true",
                            help="serve no web chat at / and no dashboard at /dashboard (and "
                                 "no /dashboard/stats): / then answers 404 as any unknown "
                                 "path")
        parser.add_argument("--allowed-origins", type=_json_list, default=[],
                            help="CORS origins as a JSON list, e.g. '[\"*\"]' (default: none, "
                                 "CORS off; vLLM allows every origin)")
        parser.add_argument("--allowed-methods", type=_json_list, default=["*"],
                            help="CORS methods as a JSON list (with --allowed-origins)")
        parser.add_argument("--allowed-headers", type=_json_list, default=["*"],
                            help="CORS headers as a JSON list (with --allowed-origins)")
        parser.add_argument("--allow-credentials", action="store_true",
                            help="CORS: allow credentials (with --allowed-origins)")
        parser.add_argument("--stream-keepalive", type=float, default=10.0,
                            help="seconds a stream may go without output (queued, or in a "
                                 "long prefill) before it is sent a keep-alive comment")
        parser.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                            help="the chat template, as a Jinja file or the template's text, "
                                 "in place of the tokenizer's")
        parser.add_argument("--enable-auto-tool-choice", action="store_true",
                            help='allow tool_choice "auto" (the default with tools): the '
                                 "model decides, and --tool-call-parser reads its calls")
        parser.add_argument("--tool-call-parser", default=None, choices=tool_parser_names(),
                            help="the model's tool-call format (hermes: Qwen2.5, Qwen3)")
        parser.add_argument("--reasoning-parser", default=None, choices=reasoning_parser_names(),
                            help="split chat outputs into message.reasoning_content and the "
                                 "answer (qwen3, deepseek_r1); structured output then "
                                 "constrains the answer only")
        parser.add_argument("--max-stored-responses", type=int,
                            default=DEFAULT_MAX_STORED_RESPONSES,
                            help="/v1/responses answers kept in memory for previous_response_id "
                                 "and GET /v1/responses/{id}; past it the oldest is evicted "
                                 "(0: none kept)")
        parser.add_argument("--headless", action="store_true",
                            help="run this machine's tensor-parallel ranks only, without the "
                                 "API server: for --node-rank 1 and up of a launch over "
                                 "--nnodes machines")
        defaults = RoutingConfig()
        parser.add_argument("--data-parallel-routing", default=defaults.policy,
                            choices=ROUTING_POLICIES,
                            help="which engine core answers a request under "
                                 "--data-parallel-size: prefix (the core holding the longest "
                                 "cached prefix of its prompt, else the least loaded), "
                                 "round-robin or least-loaded")
        parser.add_argument("--data-parallel-cache-threshold", type=float,
                            default=defaults.cache_threshold,
                            help="the share of a prompt a core must hold for prefix routing "
                                 "to choose it (default %(default)s)")
        parser.add_argument("--data-parallel-balance-threshold", type=int,
                            default=defaults.balance_threshold,
                            help="requests the core holding a prefix may have beyond the "
                                 "least loaded core's before prefix routing passes it over "
                                 "(default %(default)s)")
        parser.add_argument("--metrics-prefix", default="kvflow", choices=METRIC_PREFIXES,
                            help="the prefix of /metrics series: vllm serves vLLM's dashboards "
                                 "unchanged")
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> ServerArgs:
        if ns.model is not None and ns.model_positional not in (None, ns.model):
            raise ValueError(f"two models given: {ns.model_positional!r} and --model "
                             f"{ns.model!r}")
        ns.model = ns.model or ns.model_positional
        env_key = os.environ.get("KVFLOW_API_KEY")
        return cls(engine=EngineArgs.from_cli_args(ns), host=ns.host, port=ns.port,
                   served_model_name=ns.served_model_name or [],
                   api_key=ns.api_key or ([env_key] if env_key else []),
                   open_monitoring=ns.open_monitoring,
                   max_waiting_requests=ns.max_waiting_requests,
                   shutdown_timeout=ns.shutdown_timeout,
                   max_request_body_bytes=parse_memory(ns.max_request_body_bytes,
                                                       "--max-request-body-bytes"),
                   max_connections=ns.max_connections,
                   max_connections_per_client=ns.max_connections_per_client,
                   header_timeout=ns.header_timeout, body_timeout=ns.body_timeout,
                   write_timeout=ns.write_timeout,
                   enable_prompt_tokens_details=ns.enable_prompt_tokens_details,
                   enable_log_requests=ns.enable_log_requests, response_role=ns.response_role,
                   uvicorn_log_level=ns.uvicorn_log_level,
                   disable_uvicorn_access_log=ns.disable_uvicorn_access_log,
                   disable_fastapi_docs=ns.disable_fastapi_docs,
                   disable_web_ui=ns.disable_web_ui, headless=ns.headless, allowed_origins=ns.allowed_origins,
                   allowed_methods=ns.allowed_methods, allowed_headers=ns.allowed_headers,
                   allow_credentials=ns.allow_credentials, metrics_prefix=ns.metrics_prefix,
                   stream_keepalive=ns.stream_keepalive,
                   chat_template=(load_chat_template(ns.chat_template)
                                  if ns.chat_template is not None else None),
                   enable_auto_tool_choice=ns.enable_auto_tool_choice,
                   tool_call_parser=ns.tool_call_parser,
                   reasoning_parser=ns.reasoning_parser,
                   max_stored_responses=ns.max_stored_responses,
                   routing=RoutingConfig(ns.data_parallel_routing,
                                         ns.data_parallel_cache_threshold,
                                         ns.data_parallel_balance_threshold))


def _json_list(value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise argparse.ArgumentTypeError(f"{value!r} is not a JSON list of strings, such as "
                                         "'[\"https://example.com\"]'")
    return parsed
