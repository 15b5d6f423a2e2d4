"""OpenAI completions and chat completions on top of an EngineClient: prompts in, JSON or
server-sent events out."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvflow.engine.async_engine import EngineDeadError, RequestFailedError
from kvflow.engine.client import EngineClient
from kvflow.engine.input_preparer import PreparedRequest
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
from kvflow.sampling_params import ParameterError, StructuredOutputsParams
from kvflow.server.chat_message import MessageDeltas, MessageParser
from kvflow.server.errors import error_body
from kvflow.server.metrics import ServerMetrics
from kvflow.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest)
from kvflow.server.reasoning_parsers import ReasoningParser
from kvflow.server.tool_calls import (NamedCallParser, RequiredCallsParser,
                                      named_call_constraint, required_calls_constraint)
from kvflow.server.tool_parsers import ToolParser
from kvflow.structured_output.reasoning import AfterReasoning
from kvflow.tokenizer.chat import ChatOptions, ChatTemplate
from kvflow.tokenizer.render_process import TemplateRenderer
from kvflow.tokenizer.detokenizer import stop_holdback

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    """What one choice has sent so far in a stream."""

    sent_text: int = 0
    sent_tokens: int = 0
    echoed: int | None = None  # length of the echoed prompt, once sent
    finished: bool = False
    message: MessageDeltas = field(default_factory=MessageDeltas)  # chat: what was sent


@dataclass
class Job:
    """One HTTP request: its prompts, each prepared for the engine."""

    kind: str  # "completion" | "chat"
    model: str
    prepared: list[PreparedRequest]
    n: int
    echo: bool = False
    logprobs: int | None = None
    include_usage: bool = False
    parser: MessageParser = field(default_factory=MessageParser)  # chat: text to message
    constraint: str | None = None  # the request field that constrains the output
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id


@dataclass(frozen=True)
class StreamStep:
    output: RequestOutput  # the prompt's output so far
    choices: list[dict[str, Any]]  # the choices that changed: chat or completion chunk choices


# An SSE comment, sent when a stream has been quiet for keepalive_s: proxies keep it open.
KEEPALIVE = ": keep-alive\n\n"


def sse(event: str, body: dict[str, Any]) -> str:
    """A named server-sent event, as the Responses and Messages APIs send them."""
    return f"event: {event}\ndata: {json.dumps(body)}\n\n"


def stream_error(exc: Exception) -> tuple[int, str]:
    """The status and message that report, in-band, an exception that ended a stream."""
    known = {ParameterError: 400, RequestFailedError: 500, EngineDeadError: 503}
    status = next((code for kind, code in known.items() if isinstance(exc, kind)), None)
    if status is not None:
        return status, str(exc)
    # A bug of ours: its text (paths, internals) is not the client's to read.
    logger.exception("a stream failed")
    return 500, f"internal error: {type(exc).__name__}"


def completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ParameterError("prompt", "prompt must not be empty")
    return prompts  # type: ignore[return-value]


class OpenAIServing:
    """Prepares requests (template, tokenizer, validation) on a small pool of worker
    threads, never on the event loop: a huge prompt must not stall other clients. The fast
    tokenizers release the GIL while they encode."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics,
                 enable_prompt_tokens_details: bool = False, response_role: str = "assistant",
                 keepalive_s: float = 10.0, num_tokenizer_threads: int = 2,
                 chat_template: str | None = None,
                 generation_defaults: dict[str, Any] | None = None,
                 tool_parser: ToolParser | None = None,
                 reasoning_parser: ReasoningParser | None = None,
                 renderer: TemplateRenderer | None = None) -> None:
        """`tool_parser` parses tool_choice "auto" outputs (--enable-auto-tool-choice);
        without it, "auto" is refused. `reasoning_parser` splits chat outputs into reasoning
        and answer; structured output then constrains the answer only. `renderer`: where
        chat templates render (one made here by default)."""
        self.engine = engine
        self.keepalive_s = keepalive_s
        self.response_role = response_role
        self.enable_prompt_tokens_details = enable_prompt_tokens_details
        self.metrics = metrics
        self.tokenizer = engine.facts.tokenizer
        self.chat_template = ChatTemplate(self.tokenizer, chat_template, renderer)
        # The model's sampling defaults (engine/generation_config.py), by SamplingParams
        # field, for what a request leaves unset.
        self.generation_defaults = generation_defaults or {}
        self.tool_parser = tool_parser
        self.reasoning_parser = reasoning_parser
        self.max_sequences = engine.facts.max_num_seqs
        self._pool = ThreadPoolExecutor(num_tokenizer_threads,
                                        thread_name_prefix="kvflow-tokenize")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.chat_template.close()

    def encode(self, param: str, text: str, add_special_tokens: bool) -> list[int]:
        """The tokenizer's ids; any failure of the tokenizer is a 400 naming the field."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except Exception as exc:  # noqa: BLE001 - the client's text made the tokenizer fail
            raise ParameterError(param, f"{param} could not be tokenized: "
                                        f"{type(exc).__name__}") from None

    def _check_sequences(self, num_prompts: int, n: int) -> None:
        """prompts x n of one request; n alone (one prompt, as in chat) is checked by the
        engine for every prompt."""
        if num_prompts * n > self.max_sequences:
            raise ParameterError("n", f"{num_prompts} prompt(s) x n={n} is "
                                      f"{num_prompts * n} sequences; one request may run at "
                                      f"most max_num_seqs={self.max_sequences}")

    def prepare_completion(self, request: CompletionRequest, model: str) -> Job:
        if request.suffix:
            raise ParameterError("suffix", "suffix is not supported")
        # The field's own default (16) only where the model has none: unset is not 16.
        max_tokens = (request.max_tokens if "max_tokens" in request.model_fields_set
                      else self.generation_defaults.get("max_tokens", request.max_tokens))
        if max_tokens == 0 and not request.echo:
            raise ParameterError("max_tokens", "max_tokens=0 generates nothing: it is allowed "
                                 "only with echo=true, to return (and score) the prompt")
        prompts = completion_prompts(request)
        self._check_sequences(len(prompts), request.n)
        prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        constraint = request.output_constraint()
        params = request.sampling_params(max_tokens, request.logprobs, prompt_logprobs,
                                         constraint and constraint[1], self.generation_defaults)
        job = Job(kind="completion", model=model, prepared=[], n=params.n, echo=request.echo,
                  logprobs=request.logprobs, include_usage=request.include_usage,
                  constraint=constraint and constraint[0])
        for i, prompt in enumerate(prompts):
            engine_prompt: dict[str, Any] = (
                {"prompt": prompt, "prompt_token_ids": self.encode("prompt", prompt, True)}
                if isinstance(prompt, str) else {"prompt_token_ids": prompt})
            if request.cache_salt is not None:
                engine_prompt["cache_salt"] = request.cache_salt
            with _named_constraint_errors(constraint):
                job.prepared.append(self.engine.prepare_request(
                    f"{job.response_id}-{i}", engine_prompt, params, priority=request.priority))
        return job

    def prepare_chat(self, request: ChatCompletionRequest, model: str) -> Job:
        if request.top_logprobs is not None and not request.logprobs:
            raise ParameterError("top_logprobs", "top_logprobs needs logprobs to be true")
        text, token_ids = self.encode_chat(request.messages, request.chat_options())
        max_tokens = request.max_tokens
        if request.max_completion_tokens is not None:
            # Named here: the engine's own message would name max_tokens.
            if request.max_completion_tokens < 1:
                raise ParameterError("max_completion_tokens", "max_completion_tokens must be at "
                                     f"least 1, got {request.max_completion_tokens}")
            max_tokens = request.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.generation_defaults.get("max_tokens")
        if max_tokens == 0:
            raise ParameterError("max_tokens", "max_tokens must be at least 1, got 0")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        constraint = request.output_constraint()
        tool_parser, tool_constraint = self._tool_calls(request)
        if tool_constraint is not None:
            # A forced call's arguments are the whole output, so response_format, which
            # shapes a message's text, gives way to it (as in vLLM and OpenAI's API, and as
            # instructor's Responses mode sends both); vLLM's own constraint fields conflict.
            if constraint is not None and constraint[0] != "response_format":
                raise ParameterError("tool_choice", f"tool_choice {_choice_name(request)} "
                                     f"constrains the output, as {constraint[0]} does: give "
                                     "one of them")
            constraint = ("tools", tool_constraint)  # a schema that fails is a tool's
        if constraint is not None and self.reasoning_parser is not None:
            reasoning = self.reasoning_parser
            constraint = (constraint[0], AfterReasoning.wrap(
                constraint[1], None if reasoning.starts_inside else reasoning.start,
                reasoning.end))
        params = request.sampling_params(max_tokens, logprobs, None, constraint and constraint[1],
                                         self.generation_defaults)
        job = Job(kind="chat", model=model, prepared=[], n=params.n, logprobs=logprobs,
                  include_usage=request.include_usage,
                  parser=MessageParser(tool_parser, request.parallel_tool_calls,
                                       self.reasoning_parser),
                  constraint=constraint and constraint[0])
        prompt = {"prompt": text, "prompt_token_ids": token_ids}
        if request.cache_salt is not None:
            prompt["cache_salt"] = request.cache_salt
        with _named_constraint_errors(constraint):
            job.prepared.append(self.engine.prepare_request(
                f"{job.response_id}-0", prompt, params, priority=request.priority))
        return job

    def _tool_calls(self, request: ChatCompletionRequest
                    ) -> tuple[ToolParser | None, StructuredOutputsParams | None]:
        """The parser of the request's tool calls and, for calls it forces, the constraint
        that makes them parse; (None, None) where its output is plain content."""
        choice = request.tool_choice
        if not request.tools:
            if choice not in (None, "none"):
                raise ParameterError("tool_choice", f"tool_choice {_choice_name(request)} "
                                     "needs tools")
            return None, None
        if choice == "none":
            return None, None
        if choice in (None, "auto"):
            if self.tool_parser is None:
                raise ParameterError("tool_choice", '"auto" tool choice (the default with '
                                     "tools) needs a server started with "
                                     "--enable-auto-tool-choice and --tool-call-parser; send "
                                     'tool_choice "none", "required" or a named function')
            return self.tool_parser, None
        schemas = {tool.function.name: tool.function.parameters for tool in request.tools}
        if choice == "required":
            return RequiredCallsParser(), required_calls_constraint(
                schemas, request.parallel_tool_calls)
        if choice.function.name not in schemas:
            raise ParameterError("tool_choice", f"tool_choice names {choice.function.name!r}, "
                                 "which is not among the tools")
        return (NamedCallParser(choice.function.name),
                named_call_constraint(schemas[choice.function.name]))

    def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        if (request.prompt is None) == (request.messages is None):
            raise ParameterError("prompt", "give exactly one of prompt and messages")
        if request.messages is not None:
            _, tokens = self.encode_chat(request.messages, request.chat_options())
        else:
            tokens = self.encode("prompt", request.prompt, request.add_special_tokens)
        return {"count": len(tokens), "max_model_len": self.engine.facts.max_model_len,
                "tokens": tokens, "token_strs": None}

    def detokenize(self, request: DetokenizeRequest) -> dict[str, str]:
        vocab = self.engine.facts.model_config.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise ParameterError("tokens", f"token ids must be in [0, {vocab}), got {bad[:5]}")
        return {"prompt": self.tokenizer.decode(request.tokens)}

    def encode_chat(self, messages: list, options: ChatOptions) -> tuple[str, list[int]]:
        return self.chat_template.encode(
            [m.as_template_input() for m in messages], options,
            lambda text: self.encode("messages", text, add_special_tokens=False))

    async def _outputs(self, job: Job, idle_s: float | None = None,
                       ) -> AsyncIterator[tuple[int, RequestOutput] | None]:
        """Every prompt's outputs, interleaved as they come; leaving early aborts them all.
        With idle_s, None comes whenever that long passes without an output (a stream sends
        a keep-alive then)."""
        # Bounded: a consumer that waits on a slow client holds one output per prompt here,
        # and the engine's mailbox keeps only the latest of the rest.
        merged: asyncio.Queue = asyncio.Queue(maxsize=len(job.prepared))

        async def pump(index: int, prepared: PreparedRequest) -> None:
            try:
                async for output in self.engine.generate(prepared):
                    await merged.put((index, output))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                await merged.put((index, exc))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(job.prepared)]
        remaining = len(tasks)
        try:
            while remaining:
                try:
                    index, item = await asyncio.wait_for(merged.get(), idle_s)
                except TimeoutError:
                    yield None
                    continue
                if isinstance(item, BaseException):
                    raise item
                _raise_sample_error(job, item)
                if item.finished:
                    remaining -= 1
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _finished(self, job: Job, index: int, output: RequestOutput) -> None:
        self.metrics.observe_finished(output, job.n, job.prepared[index].children[0].max_tokens)

    async def final_outputs(self, job: Job) -> list[RequestOutput]:
        """Each prompt's finished output, in the order of the prompts."""
        finals: dict[int, RequestOutput] = {}
        async for item in self._outputs(job):
            index, output = item  # type: ignore[misc]  # no idle_s: never None
            if output.finished:
                finals[index] = output
                self._finished(job, index, output)
        return [finals[index] for index in range(len(job.prepared))]

    async def full_response(self, job: Job) -> dict[str, Any]:
        finals = await self.final_outputs(job)
        body_choices = [self._full_choice(job, index, output, completion)
                        for index, output in enumerate(finals)
                        for completion in output.outputs]
        return {"id": job.response_id,
                "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": job.model, "choices": body_choices,
                "usage": self._usage(finals)}

    def _full_choice(self, job: Job, index: int, output: RequestOutput,
                     completion: CompletionOutput) -> dict[str, Any]:
        number = index * job.n + completion.index
        if job.kind == "chat":
            message = job.parser.parse(completion.text, final=True)
            return {"index": number,
                    "message": job.parser.message_body(message, self.response_role),
                    "logprobs": self._chat_logprobs(completion.logprobs or [], job.logprobs)
                    if job.logprobs is not None else None,
                    "finish_reason": job.parser.finish_reason(message,
                                                              completion.finish_reason),
                    "stop_reason": completion.stop_reason}
        text, logprobs = completion.text, None
        if job.logprobs is not None:
            entries = list(completion.logprobs or [])
            tokens = list(completion.token_ids)
            if job.echo:
                entries = list(output.prompt_logprobs or []) + entries
                tokens = list(output.prompt_token_ids) + tokens
            logprobs = self._completion_logprobs(tokens, entries)
        if job.echo:
            text = self._prompt_text(output) + text
        return {"index": number, "text": text, "logprobs": logprobs,
                "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason}

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.tokenizer.decode(output.prompt_token_ids)

    async def stream_steps(self, job: Job) -> AsyncIterator[StreamStep | None]:
        """Each engine step's output with what its choices add (chat: OpenAI's delta
        messages); None whenever keepalive_s passes without output. The chat and completion
        streams and the other APIs' streams (responses.py, anthropic.py) are built on it."""
        choices = [[_Choice() for _ in range(job.n)] for _ in job.prepared]
        async for item in self._outputs(job, self.keepalive_s):
            if item is None:
                yield None
                continue
            index, output = item
            if output.finished:
                self._finished(job, index, output)
            chunk = [self._stream_choice(job, index, output, c, choices[index][c.index])
                     for c in output.outputs]
            yield StreamStep(output, [c for c in chunk if c is not None])

    async def stream(self, job: Job) -> AsyncIterator[str]:
        finals: list[RequestOutput] = []
        try:
            if job.kind == "chat":
                for index in range(len(job.prepared)):
                    for sample in range(job.n):
                        yield self._event(job, [{"index": index * job.n + sample,
                                                 "delta": {"role": self.response_role,
                                                           "content": ""},
                                                 "logprobs": None, "finish_reason": None}])
            async for step in self.stream_steps(job):
                if step is None:
                    yield KEEPALIVE
                    continue
                if step.output.finished:
                    finals.append(step.output)
                if step.choices:
                    yield self._event(job, step.choices)
            if job.include_usage:
                yield self._event(job, [], usage=self._usage(finals))
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            param = exc.param if isinstance(exc, ParameterError) else None
            yield f"data: {json.dumps(error_body(*stream_error(exc), param))}\n\n"
        yield "data: [DONE]\n\n"

    def _stream_choice(self, job: Job, index: int, output: RequestOutput,
                       completion: CompletionOutput, choice: _Choice) -> dict[str, Any] | None:
        if choice.finished:
            return None
        done = completion.finished()
        # Hold back what may be the start of a stop string until the request says otherwise.
        holdback = 0 if done else stop_holdback(_stop_strings(job, index))
        end = max(choice.sent_text, len(completion.text) - holdback)
        delta = completion.text[choice.sent_text:end]
        new_entries = (completion.logprobs or [])[choice.sent_tokens:]
        new_tokens = completion.token_ids[choice.sent_tokens:]
        start = choice.sent_text
        choice.sent_text, choice.sent_tokens, choice.finished = end, len(completion.token_ids), done
        prefix = ""
        if job.echo and choice.echoed is None:
            prefix = self._prompt_text(output)
            choice.echoed = len(prefix)
        # A token that decodes to no text yet (part of a character, or a held-back stop
        # string) still gets its chunk, as vLLM and llama.cpp send: clients time tokens.
        if not delta and not done and not new_tokens and not prefix:
            return None
        number = index * job.n + completion.index
        if job.kind == "chat":
            message = job.parser.parse(completion.text[:end], final=done)
            return {"index": number, "delta": choice.message.next(message),
                    "logprobs": self._chat_logprobs(new_entries, job.logprobs)
                    if job.logprobs is not None else None,
                    "finish_reason": job.parser.finish_reason(message,
                                                              completion.finish_reason),
                    "stop_reason": completion.stop_reason}
        offset = (choice.echoed or 0) + start  # text_offset counts from the whole text's start
        return {"index": number, "text": prefix + delta,
                "logprobs": self._completion_logprobs(new_tokens, new_entries, offset,
                                                      (choice.echoed or 0) + end)
                if job.logprobs is not None else None,
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}

    def _usage(self, outputs: Iterable[RequestOutput]) -> dict[str, Any]:
        outputs = list(outputs)
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
        if self.enable_prompt_tokens_details:
            usage["prompt_tokens_details"] = {
                "cached_tokens": sum(o.num_cached_tokens or 0 for o in outputs)}
        return usage

    def _event(self, job: Job, choices: list[dict[str, Any]],
               usage: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {
            "id": job.response_id,
            "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": job.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def _token_text(self, token_id: int, entry: dict[int, Logprob] | None) -> str:
        if entry is not None and token_id in entry and entry[token_id].decoded_token is not None:
            return entry[token_id].decoded_token  # type: ignore[return-value]
        return self.tokenizer.decode([token_id])

    def _completion_logprobs(self, tokens: list[int], entries: list, offset: int = 0,
                             end: int | None = None) -> dict[str, list]:
        """The legacy completions shape; top_logprobs holds the top N and the chosen token.
        text_offset counts characters from the start of the choice's whole text, up to `end`,
        where the text sent so far ends: tokens decoded one by one can add up to more text
        than they make together (the halves of one character), and the offsets of the next
        chunk start at `end`."""
        result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                   "text_offset": []}
        for token_id, entry in zip(tokens, entries):
            text = self._token_text(token_id, entry)
            result["tokens"].append(text)
            result["token_logprobs"].append(entry[token_id].logprob if entry else None)
            result["top_logprobs"].append(
                {lp.decoded_token: lp.logprob for lp in entry.values()} if entry else None)
            result["text_offset"].append(offset if end is None else min(offset, end))
            offset += len(text)
        return result

    @staticmethod
    def _chat_logprobs(entries: list[dict[int, Logprob]], top_n: int) -> dict[str, list]:
        def item(lp: Logprob) -> dict[str, Any]:
            token = lp.decoded_token or ""
            return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode())}

        content = []
        for entry in entries:
            chosen = next(iter(entry.values()))  # the sampled token comes first
            top = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= top_n),
                         key=lambda lp: lp.rank)
            content.append({**item(chosen), "top_logprobs": [item(lp) for lp in top]})
        return {"content": content}


@contextmanager
def _named_constraint_errors(constraint: tuple[str, StructuredOutputsParams] | None
                             ) -> Iterator[None]:
    """The engine names structured_outputs when it cannot compile a constraint; the client
    may have sent it as response_format or guided_json."""
    try:
        yield
    except ParameterError as exc:
        if constraint is None or exc.param != "structured_outputs":
            raise
        raise ParameterError(constraint[0], f"{constraint[0]}: {exc}") from None


def _raise_sample_error(job: Job, output: RequestOutput) -> None:
    """A sample the engine ended because its output could no longer follow the request's
    constraint fails the request, naming that field (leaving aborts the other samples)."""
    error = next((c.error for c in output.outputs if c.error is not None), None)
    if error is not None:
        field_name = job.constraint or "structured_outputs"
        raise ParameterError(field_name, f"{field_name}: {error}")


def _choice_name(request: ChatCompletionRequest) -> str:
    choice = request.tool_choice
    return repr(choice) if isinstance(choice, str) else f"naming {choice.function.name!r}"


def _stop_strings(job: Job, index: int) -> tuple[str, ...]:
    return job.prepared[index].children[0].sampling_params.stop_strings
