"""`kvflow serve`: the OpenAI-compatible HTTP server.

The server binds at once and loads the model on a background thread: /health answers 503
until the engine is up (and whenever it has died). Every error, bad input included, is
the OpenAI shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

import kvflow
from kvflow.engine.async_engine import (ENGINE_STOPPED, AsyncEngine, EngineDeadError,
                                        RequestFailedError)
from kvflow.engine.client import EngineClient
from kvflow.engine.dp_client import DataParallelClient
from kvflow.engine.generation_config import load_generation_defaults
from kvflow.distributed.comm import WorkerFailedError
from kvflow.engine.llm_engine import LLMEngine
from kvflow.logger import RepeatFilter
from kvflow.server.connections import (RESERVED_DESCRIPTORS, default_max_connections,
                                       default_max_per_client, guarded_protocol,
                                       raise_descriptor_limit)
from kvflow.server.anthropic import AnthropicMessages
from kvflow.server.anthropic_protocol import MessagesInput, MessagesRequest
from kvflow.server.args import ServerArgs
from kvflow.server.dashboard import DashboardFeed
from kvflow.server.errors import ApiError, error_response, printable
from kvflow.server.metrics import ServerMetrics
from kvflow.server.middleware import (ApiKeyMiddleware, BodyLimitMiddleware,
                                      ClientTimeoutMiddleware, JsonDepthMiddleware)
from kvflow.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    OpenAIModel, TokenizeRequest)
from kvflow.sampling_params import ParameterError
from kvflow.server.serving import Job, OpenAIServing
from kvflow.server.reasoning_parsers import get_reasoning_parser
from kvflow.server.response_store import ResponseStore
from kvflow.server.responses import Responses
from kvflow.server.responses_protocol import ResponsesRequest
from kvflow.server.tool_parsers import get_tool_parser
from kvflow.server.unserved import UNSERVED_ROOTS, not_served_message
from kvflow.server.web_ui import STATS_PATH, add_web_ui, load_web_files, public_paths
from kvflow.tokenizer.render_process import TemplateRenderer

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_AFTER_RANK_FAILURE_S = 1.0

# Routes --api-key leaves open: they say only whether the server is up and what it runs.
OPEN_PATHS = ("/health", "/version")
# Open with --open-monitoring, for scrapers and load balancers. /metrics counts prefix-cache
# hits, which tell whether someone sent a given prompt, so the key guards them by default.
MONITORING_PATHS = ("/metrics", "/load", "/ping", STATS_PATH)
ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


class ClosingStreamingResponse(StreamingResponse):
    """A stream whose body is closed as soon as the response ends, however it ends.
    Starlette leaves a body that a failed send interrupted (--write-timeout, a client gone)
    suspended until the garbage collector finds it, and an exception's traceback can hold it
    for a collection cycle: meanwhile its request kept generating and counted as in flight,
    which held a graceful shutdown."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


class ServerState:
    def __init__(self, args: ServerArgs, renderer: TemplateRenderer | None = None) -> None:
        """renderer: chat templates' render workers, already starting (kvflow/cli.py);
        None: started at load."""
        self.args = args
        self.renderer = renderer
        self.metrics = ServerMetrics(args.model_names[0], args.metrics_prefix)
        self.engine: EngineClient | None = None
        self.serving: OpenAIServing | None = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.created = int(time.time())
        self.in_flight = 0  # generation requests being answered (GET /load)
        self.response_store = ResponseStore(args.max_stored_responses)
        self.dashboard: DashboardFeed | None = None  # with the web UI, once loaded

    def load(self) -> None:
        """The engine, then one generation and a probe render of the chat template, before
        /health says 200: a model that loads but cannot answer is a failed load."""
        try:
            renderer = self.renderer
            if renderer is None:
                renderer = TemplateRenderer()
                renderer.prestart()  # its imports overlap the model's loading
            engine: EngineClient
            if self.args.engine.data_parallel_size > 1:
                engine = DataParallelClient(self.args.engine, self.args.routing,
                                            on_failure=self._engine_failed)
            else:
                engine = AsyncEngine(LLMEngine(self.args.engine),
                                     on_failure=self._engine_failed)
            facts = engine.facts
            self.metrics.bind(facts.max_model_len, facts.cache_config_info,
                              num_speculative_tokens=facts.num_speculative_tokens,
                              num_engines=len(engine.cores()))
            defaults = load_generation_defaults(
                self.args.engine.generation_config, facts.model_config.path,
                self.args.engine.override_generation_config)
            self.serving = OpenAIServing(engine, self.metrics,
                                         self.args.enable_prompt_tokens_details,
                                         self.args.response_role, self.args.stream_keepalive,
                                         chat_template=self.args.chat_template,
                                         generation_defaults=defaults,
                                         tool_parser=get_tool_parser(self.args.tool_call_parser)
                                         if self.args.enable_auto_tool_choice else None,
                                         reasoning_parser=get_reasoning_parser(
                                             self.args.reasoning_parser)
                                         if self.args.reasoning_parser else None,
                                         renderer=renderer)
            engine.check_answers()
            if self.serving.chat_template.available:
                self.serving.chat_template.probe()
            engine.start()
            if not self.args.disable_web_ui:
                self.dashboard = DashboardFeed(engine, self.args.model_names[0])
            self.engine = engine
            logger.info("serving %s at http://%s:%d", ", ".join(self.args.model_names),
                        self.args.host, self.args.port)
        except BaseException as exc:  # noqa: BLE001 - reported by /health and every route
            logger.exception("the model failed to load")
            self.load_error = exc
            self._engine_failed(exc)

    @staticmethod
    def _engine_failed(exc: BaseException) -> None:
        """A failed rank leaves nothing to serve with (the engine cannot restart its ranks):
        the server exits, as vLLM's does when its engine core dies, once the streams have
        had their error events (/health answers 503 meanwhile)."""
        if isinstance(exc, WorkerFailedError):
            logger.error("the server exits in %g s: %s", EXIT_AFTER_RANK_FAILURE_S, exc)
            threading.Timer(EXIT_AFTER_RANK_FAILURE_S, os.kill,
                            (os.getpid(), signal.SIGTERM)).start()

    def begin_shutdown(self) -> None:
        """Refuse new requests; give running ones shutdown_timeout seconds, then abort them
        so that every stream ends with an error event instead of a cut connection."""
        if self.draining:
            return
        self.draining = True
        engine = self.engine
        if engine is None:
            return

        def drain() -> None:
            deadline = time.monotonic() + self.args.shutdown_timeout
            while engine.has_unfinished_requests() and time.monotonic() < deadline:
                time.sleep(0.05)
            engine.abort_all("the server is shutting down")

        threading.Thread(target=drain, name="kvflow-drain", daemon=True).start()

    def ready(self) -> tuple[EngineClient, OpenAIServing]:
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}")
        if self.engine is None or self.serving is None:
            raise ApiError(503, "the model is still loading", headers={"Retry-After": "5"})
        if not self.engine.alive:
            raise ApiError(503, ENGINE_STOPPED)
        return self.engine, self.serving

    @contextmanager
    def answering(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def counted(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream that counts as in flight until its last chunk is sent."""
        # Closed with this stream, not whenever the collector finds it (the request it
        # streams is aborted as it closes).
        async with aclosing(chunks):
            with self.answering():
                async for chunk in chunks:
                    yield chunk

    def check_model(self, name: str | None) -> None:
        if name is not None and not self.args.serves(name):
            raise ApiError(404, f"model {name!r} does not exist; this server serves "
                                f"{self.args.model_names}", "model")

    def check_capacity(self, engine: EngineClient, num_sequences: int) -> None:
        """--max-waiting-requests counts sequences (a prompt's n samples are n): one
        request cannot queue past it, however many prompts and samples it carries."""
        limit = self.args.max_waiting_requests
        if limit is None:
            return
        if num_sequences > limit:
            raise ApiError(400, f"the request has {num_sequences} sequences (prompts x n); the "
                                f"server queues at most {limit}", "n")
        waiting = engine.num_waiting_sequences
        if waiting + num_sequences > limit:
            raise ApiError(503, f"the server is at capacity ({waiting} of {limit} sequences "
                                "waiting); retry later", headers={"Retry-After": "1"})


MAX_LOGGED_FIELDS = 10
DROPPED_UNPREPARED = "client disconnected before its request was prepared; the request is dropped"


async def _unless_disconnected(work: Awaitable[T], http_request: Request,
                               left: str = "client disconnected; aborting its request"
                               ) -> T | Response:
    """Awaits work, cancelling it if the client goes away first (logging `left`): a
    client that gives up must not keep the engine, or a tokenizer thread, busy. Cancelling
    aborts the work's requests in the engine, and drops work still queued for a thread."""
    task = asyncio.ensure_future(work)
    # After the body, the next ASGI message is the client's disconnect.
    disconnect = asyncio.ensure_future(http_request.receive())
    try:
        await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return Response(status_code=499)
    finally:
        disconnect.cancel()
        if not task.done():  # the client left (or the server is cancelling this handler)
            logger.info(left)
            task.cancel()


def _warn_unknown(request: OpenAIModel) -> None:
    """Unknown field names are the client's text: escaped, truncated and few."""
    extra = sorted(request.model_extra or ())
    if extra:
        names = ", ".join(printable(name, 64) for name in extra[:MAX_LOGGED_FIELDS])
        more = f" and {len(extra) - MAX_LOGGED_FIELDS} more" if len(extra) > MAX_LOGGED_FIELDS \
            else ""
        logger.warning("ignoring unknown request fields: %s%s", names, more)


def create_app(args: ServerArgs, renderer: TemplateRenderer | None = None) -> FastAPI:
    state = ServerState(args, renderer)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        threading.Thread(target=state.load, name="kvflow-load", daemon=True).start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown, args.shutdown_timeout)
        if state.serving is not None:
            state.serving.close()

    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} \
        if args.disable_fastapi_docs else {}
    app = FastAPI(title="kvflow", version=kvflow.__version__, lifespan=lifespan, **docs)
    # Pure ASGI middleware (not @app.middleware, whose wrapping hides a client's disconnect
    # from the routes); the last added runs first: the key is checked before the body is read.
    app.add_middleware(JsonDepthMiddleware)
    app.add_middleware(ClientTimeoutMiddleware, body_timeout=args.body_timeout,
                       write_timeout=args.write_timeout)
    app.add_middleware(BodyLimitMiddleware, max_bytes=args.max_request_body_bytes)
    web_files = None if args.disable_web_ui else load_web_files()
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_keys=args.api_key, open_paths=OPEN_PATHS + (
            MONITORING_PATHS if args.open_monitoring else ()) + (
            public_paths(web_files) if web_files is not None else ()))
    if args.allowed_origins:  # outermost, so that preflights need no key
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins,
                           allow_methods=args.allowed_methods, allow_headers=args.allowed_headers,
                           allow_credentials=args.allow_credentials)
    app.state.kvflow = state

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.headers,
                              request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The deepest error is the most specific: where a field takes a string or a list, the
        # string's error comes first, while the list's names the item that is wrong.
        first = max(exc.errors(), key=lambda error: len(error.get("loc", ())), default={})
        cause = (first.get("ctx") or {}).get("error")
        path = request.url.path
        if isinstance(cause, ParameterError):  # raised by a validator of ours
            return error_response(400, str(cause), cause.param, path=path)
        # Less the union members pydantic names by their types (list[...], function-after[...]).
        location = [str(part) for part in first.get("loc", ())
                    if part != "body" and "[" not in str(part)]
        where = ".".join(location)
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", path=path)
        if not location:
            return error_response(400, "the request body must be a JSON object", path=path)
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else str(
            first.get("msg", "invalid request"))
        return error_response(400, message, location[0] if location else None, path=path)

    # Only a ParameterError is the client's fault; any other ValueError is a bug of ours and
    # its text (paths, internals) is not the client's to read.
    @app.exception_handler(ParameterError)
    async def on_parameter_error(request: Request, exc: ParameterError) -> JSONResponse:
        return error_response(400, str(exc), exc.param, path=request.url.path)

    @app.exception_handler(RequestFailedError)
    async def on_request_failed(request: Request, exc: RequestFailedError) -> JSONResponse:
        return error_response(500, str(exc), path=request.url.path)

    @app.exception_handler(EngineDeadError)
    async def on_engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, str(exc), path=request.url.path)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), path=request.url.path)

    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(_request: Request, _exc: ClientDisconnect) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}",
                              path=request.url.path)

    def admit(request: OpenAIModel, model: str | None) -> tuple[OpenAIServing, str]:
        """The serving object and the model name for a generation request, once the server
        is ready and the request names a model it serves."""
        _, serving = state.ready()
        _warn_unknown(request)
        state.check_model(model)
        return serving, model or args.model_names[0]

    async def unless_left(work: Awaitable[T], http_request: Request) -> T:
        """A request prepared on a tokenizer thread, dropped unrun if its client leaves
        while it waits for one: ClientDisconnect, answered with a 499 nobody reads."""
        prepared = await _unless_disconnected(work, http_request, DROPPED_UNPREPARED)
        if isinstance(prepared, Response):
            raise ClientDisconnect
        return prepared

    async def answer(job: Job, stream: bool, streamed: Callable[[], AsyncIterator[str]],
                     whole: Callable[[], Awaitable[Any]], http_request: Request) -> Any:
        """A prepared job's answer, as every generation API gives it: server-sent events
        from `streamed`, or the body `whole` builds, abandoned if the client leaves."""
        engine, _ = state.ready()
        state.check_capacity(engine, sum(len(p.children) for p in job.prepared))
        if args.enable_log_requests:  # sizes and parameters, never the client's text
            first = job.prepared[0].children[0].sampling_params
            logger.info("request %s: %d prompt(s) of %s tokens, n=%d, max_tokens=%s, "
                        "temperature=%g, top_p=%g, top_k=%d, seed=%s", job.response_id,
                        len(job.prepared), [len(p.parent.prompt_token_ids) for p in job.prepared],
                        job.n, job.prepared[0].children[0].max_tokens, first.temperature,
                        first.top_p, first.top_k, first.seed)
        if stream:
            return ClosingStreamingResponse(state.counted(streamed()),
                                            media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache"})
        with state.answering():
            return await _unless_disconnected(whole(), http_request)

    async def generate(request: CompletionRequest | ChatCompletionRequest,
                       http_request: Request) -> Any:
        serving, model = admit(request, request.model)
        prepare = (serving.prepare_chat if isinstance(request, ChatCompletionRequest)
                   else serving.prepare_completion)
        job = await unless_left(serving.off_loop(prepare, request, model), http_request)
        return await answer(job, request.stream, lambda: serving.stream(job),
                            lambda: serving.full_response(job), http_request)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http_request: Request) -> Any:
        return await generate(request, http_request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http_request: Request) -> Any:
        return await generate(request, http_request)

    @app.post("/v1/responses")
    async def create_response(request: ResponsesRequest, http_request: Request) -> Any:
        serving, model = admit(request, request.model)
        responses = Responses(serving, state.response_store)
        pending = await unless_left(serving.off_loop(responses.prepare, request, model),
                                    http_request)
        return await answer(pending.job, request.stream, lambda: responses.stream(pending),
                            lambda: responses.full(pending), http_request)

    @app.post("/v1/messages")
    async def create_message(request: MessagesRequest, http_request: Request) -> Any:
        serving, model = admit(request, request.model)
        messages = AnthropicMessages(serving)
        pending = await unless_left(serving.off_loop(messages.prepare, request, model),
                                    http_request)
        return await answer(pending.job, request.stream, lambda: messages.stream(pending),
                            lambda: messages.full(pending), http_request)

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(request: MessagesInput,
                                   http_request: Request) -> dict[str, int]:
        serving, _ = admit(request, request.model)
        return await unless_left(
            serving.off_loop(AnthropicMessages(serving).count_tokens, request), http_request)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> dict[str, Any]:
        stored = state.response_store.get(response_id)
        if stored is None:
            raise ApiError(404, state.response_store.missing(response_id), "response_id")
        return stored.body

    def model_card(name: str) -> dict[str, Any]:
        engine, _ = state.ready()
        return {"id": name, "object": "model", "created": state.created, "owned_by": "kvflow",
                "root": args.model_names[0], "parent": None,
                "max_model_len": engine.facts.max_model_len, "permission": []}

    # SGLang's worker endpoints, which its model gateway (sglang-router) reads when it
    # registers a worker: the model's name and path, and the limits it schedules by.
    @app.get("/get_model_info")
    @app.get("/model_info", include_in_schema=False)
    async def sglang_model_info() -> dict[str, Any]:
        engine, _ = state.ready()
        facts = engine.facts
        return {"model_path": str(args.engine.model), "tokenizer_path":
                str(args.engine.tokenizer or args.engine.model),
                "served_model_name": args.model_names[0], "is_generation": True,
                "model_type": facts.model_config.architecture,
                "max_context_length": facts.max_model_len,
                "max_req_input_len": facts.max_model_len - 1,
                "vocab_size": facts.model_config.vocab_size}

    @app.get("/get_server_info")
    @app.get("/server_info", include_in_schema=False)
    async def sglang_server_info() -> dict[str, Any]:
        engine, _ = state.ready()
        facts = engine.facts
        return {"model": args.model_names[0], "model_path": str(args.engine.model),
                "served_model_name": args.model_names[0], "version": kvflow.__version__,
                "dp_size": args.engine.data_parallel_size,
                "tp_size": args.engine.tensor_parallel_size,
                "pp_size": args.engine.pipeline_parallel_size,
                "max_running_requests": facts.max_num_seqs,
                "max_total_tokens": facts.kv_cache_tokens,
                "max_prefill_tokens": args.engine.max_num_batched_tokens,
                "max_req_input_len": facts.max_model_len - 1,
                "num_running": engine.stats.num_running,
                "num_waiting": engine.num_waiting_sequences}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in args.model_names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        state.ready()
        state.check_model(name)
        return model_card(name)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest, http_request: Request) -> dict[str, Any]:
        _, serving = state.ready()
        state.check_model(request.model)
        return await unless_left(serving.off_loop(serving.tokenize, request), http_request)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, str]:
        _, serving = state.ready()
        state.check_model(request.model)
        return await serving.off_loop(serving.detokenize, request)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        engine, _ = state.ready()
        num_blocks = await engine.reset_prefix_cache()
        logger.info("prefix cache reset: %d cached blocks forgotten", num_blocks)
        return Response(status_code=200)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        engine, _ = state.ready()
        if engine.degraded:  # serving, on fewer engine cores than it started with
            return JSONResponse({"status": "degraded", "engines": [
                {"engine": core.index, "alive": core.alive, "failure": core.failure}
                for core in engine.cores()]})
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:  # vLLM's (SageMaker's) name for /health
        return await health()

    @app.get("/load")
    async def load() -> dict[str, Any]:
        body: dict[str, Any] = {"server_load": state.in_flight}
        if state.engine is not None:  # what the KV cache holds, and what chose its size
            info = state.engine.facts.cache_config_info
            body["kv_cache"] = {"num_tokens": int(info["num_tokens"]),
                                "sized_by": info["sized_by"]}
            body["engines"] = [
                {"engine": core.index, "alive": core.alive, "num_requests": core.num_requests,
                 "num_running": core.stats.num_running, "num_waiting": core.num_waiting,
                 "kv_cache_usage": core.stats.kv_cache_usage, "routed": core.routed}
                for core in state.engine.cores()]
        return body

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": kvflow.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.engine is not None:
            state.metrics.observe_engine(state.engine.cores(), state.engine.observations)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if web_files is not None:
        def dashboard_stats() -> dict[str, Any]:
            state.ready()
            assert state.dashboard is not None  # made with the engine, which is ready
            return state.dashboard.snapshot(state.in_flight)

        add_web_ui(app, web_files, dashboard_stats)

    # Last, so that every route above is tried first.
    async def not_served(request: Request) -> Response:
        path, method = request.url.path, request.method
        allowed = sorted({m for route in app.routes if isinstance(route, APIRoute)
                          and route.endpoint is not not_served and route.path_regex.match(path)
                          for m in route.methods})
        if allowed:
            return error_response(405, f"{method} is not allowed here; use {', '.join(allowed)}",
                                  headers={"Allow": ", ".join(allowed)}, path=path)
        return error_response(501, not_served_message(path), path=path)

    for path in ("/v1/{rest:path}", *UNSERVED_ROOTS):
        app.add_api_route(path, not_served, methods=list(ALL_METHODS), include_in_schema=False)
    return app


def serve(args: ServerArgs, renderer: TemplateRenderer | None = None) -> None:
    import uvicorn

    app = create_app(args, renderer)
    state: ServerState = app.state.kvflow

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.begin_shutdown()
            super().handle_exit(sig, frame)

    descriptors = raise_descriptor_limit()
    max_connections = args.max_connections or default_max_connections(descriptors)
    max_per_client = (args.max_connections_per_client
                      or default_max_per_client(max_connections))
    if max_connections > descriptors - RESERVED_DESCRIPTORS:
        logger.warning("--max-connections %d leaves fewer than %d of the %d open files this "
                       "process may have to the rest of it", max_connections,
                       RESERVED_DESCRIPTORS, descriptors)
    # uvicorn's own grace outlasts ours, so streams end through the engine, not a cut socket.
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level,
                            access_log=not args.disable_uvicorn_access_log,
                            timeout_graceful_shutdown=int(args.shutdown_timeout) + 5,
                            http=guarded_protocol(max_connections, max_per_client,
                                                  args.header_timeout))
    repeats = RepeatFilter()
    logging.getLogger("asyncio").addFilter(repeats)
    for name in ("kvflow", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(repeats)
    logger.info("connections: at most %d (%d from one address), headers within %g s, "
                "bodies within %g s, responses read within %g s", max_connections,
                max_per_client, args.header_timeout,
                args.body_timeout, args.write_timeout)
    Server(config).run()
