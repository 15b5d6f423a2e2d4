"""OpenAI request models. Unknown fields are kept (and logged by the server), as vLLM does:
benchmark tools send extras such as `best_of: 1`."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvflow import json_depth
from kvflow.sampling_params import (STRUCTURED_OUTPUT_KINDS, ParameterError, SamplingParams,
                                    StructuredOutputsParams)
from kvflow.tokenizer.chat import ChatOptions


class OpenAIModel(BaseModel):
    # strict, as vLLM: "n": "1" or "stream": "yes" is a 400, not a guess (an int still
    # passes where a float is asked for)
    model_config = ConfigDict(extra="allow", strict=True)


def _lone_surrogate_path(value: Any) -> tuple[str, ...] | None:
    """Where in a parsed JSON body a string holds a lone surrogate ("\\ud800" is valid
    JSON but not text: tokenizers and UTF-8 encoders refuse it). Iterative: a client picks
    the depth."""
    pending: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(item, dict):
            # Reversed onto the stack, so that the first offender in document order is found.
            for key, child in reversed(item.items()):
                pending.append((child, (*path, str(key))))
                if isinstance(key, str):
                    pending.append((key, path))
        elif isinstance(item, list):
            pending.extend((child, (*path, str(index)))
                           for index, child in reversed(list(enumerate(item))))
    return None


# Entries of a request's lists, counted before any entry is validated: validating one takes
# microseconds of the event loop, and the body limit alone lets 100,000 through. OpenAI
# allows 128 tools.
MAX_TOOLS = 128
MAX_MESSAGES = 4096


class TopLevelRequest(OpenAIModel):
    """A whole request body: its lists within LIST_CAPS, every string in it valid text."""

    LIST_CAPS: ClassVar[dict[str, int]] = {}  # field name: most entries

    @model_validator(mode="before")
    @classmethod
    def _valid_body(cls, data: Any) -> Any:
        for name, limit in cls.LIST_CAPS.items():
            entries = data.get(name) if isinstance(data, dict) else None
            if isinstance(entries, list) and len(entries) > limit:
                raise ParameterError(name, f"{name} has {len(entries):,} entries; at most "
                                           f"{limit:,} are allowed")
        path = _lone_surrogate_path(data)
        if path is not None:
            field = ".".join(path) or "body"
            raise ParameterError(path[0] if path else "body",
                                 f"{field} contains a lone UTF-16 surrogate, which is not text")
        return data


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class JsonSchemaFormat(OpenAIModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is enforced either way, as in vLLM


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# The request fields that constrain the output, at most one per request: OpenAI's, vLLM's,
# and vLLM's older guided_* ones (each the StructuredOutputsParams field it sets).
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
# Options of vLLM's structured_outputs that ask for what kvflow always does.
_ALWAYS_SO = {"disable_fallback", "disable_any_whitespace"}


class SamplingFields(TopLevelRequest):
    """The sampling fields of chat completions that the Responses and Messages APIs take
    too, under the same names (vLLM's extras there): the server passes those a request sets
    on to the chat request it is rendered into."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int = 0
    cache_salt: str | None = None
    user: str | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None

    def sampling_fields_set(self) -> dict[str, Any]:
        """The sampling fields this request sets, as JSON values."""
        return self.model_dump(include=self.model_fields_set & SamplingFields.model_fields.keys())


class _GenerationRequest(SamplingFields):
    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    truncate_prompt_tokens: int | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def output_constraint(self) -> tuple[str, StructuredOutputsParams] | None:
        """The field that constrains the output and what it asks, or None; a ParameterError
        names the field."""
        given = [name for name in ("response_format", "structured_outputs", *_GUIDED_FIELDS)
                 if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise ParameterError(given[1], f"give at most one of {', '.join(given)}: each "
                                           "constrains the whole output")
        if not given:
            return None
        name = given[0]
        try:
            return name, self._constraint(name)
        except ParameterError as exc:
            raise ParameterError(name, f"{name}: {exc}") from None

    def _constraint(self, name: str) -> StructuredOutputsParams:
        if name in _GUIDED_FIELDS:
            return StructuredOutputsParams(**{_GUIDED_FIELDS[name]: getattr(self, name)})
        if name == "structured_outputs":
            unknown = sorted(set(self.structured_outputs) - set(STRUCTURED_OUTPUT_KINDS)
                             - _ALWAYS_SO)
            if unknown:
                raise ParameterError(name, f"{', '.join(unknown)} not supported; kvflow takes "
                                           f"{', '.join(STRUCTURED_OUTPUT_KINDS)}")
            return StructuredOutputsParams(**{key: value for key, value in
                                              self.structured_outputs.items()
                                              if key in STRUCTURED_OUTPUT_KINDS})
        if self.response_format.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.response_format.json_schema is None or \
                self.response_format.json_schema.schema_ is None:
            raise ParameterError(name, "a json_schema response format needs json_schema.schema")
        return StructuredOutputsParams(json=self.response_format.json_schema.schema_)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None,
                        structured_outputs: StructuredOutputsParams | None = None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """`defaults` (the model's, by SamplingParams field) fill the sampling fields the
        request leaves unset; the caller resolves max_tokens. Raises ValueError naming the
        field for out-of-range values."""
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty") if getattr(self, name) is not None}
        given = {**{name: value for name, value in (defaults or {}).items()
                    if name != "max_tokens"}, **given}
        return SamplingParams(
            n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            logit_bias=_token_bias(self.logit_bias), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, max_tokens=max_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=structured_outputs, **given)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _token_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise ParameterError("logit_bias",
                             f"logit_bias keys must be token ids, got {list(bias)[:5]}") from None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class TextPart(OpenAIModel):
    type: str
    text: str | None = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text


class MessageToolCall(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        # An assistant's tool-call turn comes with "content": null; many templates read
        # message['content'] directly, so it renders as the empty string (as in vLLM).
        message.setdefault("content", "")
        if isinstance(self.content, list):
            if any(part.type != "text" or part.text is None for part in self.content):
                raise ParameterError("messages", "only text content parts are supported")
            message["content"] = "\n".join(part.text for part in self.content)  # type: ignore
        # Templates write arguments with tojson (as transformers documents): an object,
        # not the JSON text OpenAI sends.
        for call in message.get("tool_calls", ()):
            try:
                call["function"]["arguments"] = json_depth.loads(call["function"]["arguments"])
            except json_depth.TooDeepError as exc:
                raise ParameterError("messages", "tool_calls[].function.arguments "
                                     f"{exc}") from None
            except ValueError:
                raise ParameterError("messages", "tool_calls[].function.arguments must be "
                                     "JSON text") from None
        return message


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no parameters
    strict: bool | None = None  # forced calls follow the schema either way


class ChatTool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class _ChatInput(TopLevelRequest):
    """What renders messages into a prompt, besides the messages (vLLM's fields)."""

    LIST_CAPS = {"messages": MAX_MESSAGES, "tools": MAX_TOOLS}
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # refused: the server's template applies

    def chat_options(self) -> ChatOptions:
        if self.chat_template is not None:
            raise ParameterError("chat_template", "a request's own chat_template is not "
                                 "accepted: the server renders with its --chat-template or "
                                 "the tokenizer's")
        return ChatOptions(add_generation_prompt=self.add_generation_prompt,
                           continue_final_message=self.continue_final_message,
                           chat_template_kwargs=self.chat_template_kwargs or {})


class ChatCompletionRequest(_GenerationRequest, _ChatInput):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    # None: "auto" with tools, else "none" (OpenAI's defaults)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def chat_options(self) -> ChatOptions:
        options = super().chat_options()
        if not self.tools:
            return options
        counts = Counter(tool.function.name for tool in self.tools)
        repeated = sorted(name for name, count in counts.items() if count > 1)
        if repeated:
            raise ParameterError("tools", f"tools declares {', '.join(repeated)} more than once")
        return replace(options, tools=[tool.model_dump(exclude_none=True) for tool in self.tools])


class TokenizeRequest(_ChatInput):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(TopLevelRequest):
    model: str | None = None
    tokens: list[int]
