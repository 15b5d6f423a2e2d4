"""A request made ready for an engine: its prompt tokenized, its parameters resolved and
checked against the model and the KV pool, its grammar compiled. It reads only what is
fixed once an engine has loaded (InputLimits), so it runs on any thread, and in any
process: a data-parallel API server prepares requests for engine cores in other
processes, and answers a bad request before any core sees it.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from kvflow.engine.output_processor import ParentState
from kvflow.outputs import CompletionOutput, RequestMetrics
from kvflow.request import Request
from kvflow.sampling_params import ALL_LOGPROBS, ParameterError, SamplingParams
from kvflow.structured_output.compiler import GrammarCompiler
from kvflow.core.kv_manager import cdiv

PromptType = str | Mapping[str, Any]

MAX_CACHE_SALT_CHARS = 256


@dataclass(frozen=True)
class InputLimits:
    """What a request is checked against: plain values, sent between processes."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    max_logprobs: int  # -1: no limit
    block_size: int
    num_usable_blocks: int  # the KV pool's
    eos_token_ids: frozenset[int]

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_usable_blocks * self.block_size


@dataclass
class PreparedRequest:
    """A validated request: the user-facing parent and its n scheduler requests, with the
    resolved parameters they came from (an engine core in another process prepares its
    own copy from them: grammar matchers do not cross processes)."""

    parent: ParentState
    children: list[Request]
    params: SamplingParams
    priority: int = 0

    @property
    def source(self) -> dict[str, Any]:
        """The prompt as a prompt_token_ids mapping that prepares to the same request."""
        source: dict[str, Any] = {"prompt_token_ids": self.parent.prompt_token_ids,
                                  "prompt": self.parent.prompt}
        if self.children[0].cache_salt is not None:
            source["cache_salt"] = self.children[0].cache_salt
        return source


class InputPreparer:
    def __init__(self, tokenizer: Any, limits: InputLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.grammar_compiler = GrammarCompiler(tokenizer, limits.vocab_size,
                                                limits.eos_token_ids)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ParameterError("prompt", f"a prompt must be a string or a dict with 'prompt' or "
                         f"'prompt_token_ids', got {type(prompt).__name__}")

    @staticmethod
    def cache_salt(prompt: PromptType) -> str | None:
        salt = prompt.get("cache_salt") if isinstance(prompt, Mapping) else None
        if salt is None:
            return None
        if not isinstance(salt, str) or not salt or len(salt) > MAX_CACHE_SALT_CHARS:
            raise ParameterError("cache_salt", f"cache_salt must be a string of 1 to "
                                               f"{MAX_CACHE_SALT_CHARS} characters")
        try:
            salt.encode("utf-8")
        except UnicodeEncodeError:
            raise ParameterError("cache_salt", "cache_salt is not valid text") from None
        return salt

    def prepare(self, request_id: str, prompt: PromptType, params: SamplingParams,
                arrival_time: float | None = None, priority: int = 0) -> PreparedRequest:
        text, token_ids = self.tokenize_prompt(prompt)
        keep = params.truncate_prompt_tokens
        if keep is not None:
            keep = self.limits.max_model_len if keep == -1 else keep
            if len(token_ids) > keep:
                # The text no longer matches the tokens: an echo decodes the tokens instead.
                text, token_ids = None, token_ids[-keep:]
        cache_salt = self.cache_salt(prompt)
        params = self.resolve(params)
        max_tokens = self.validate(token_ids, params)
        # Compiled here, on the caller's thread: a bad schema never reaches the engine thread.
        grammar = (None if params.structured_outputs is None
                   else self.grammar_compiler.compile(params.structured_outputs))
        arrival = time.monotonic() if arrival_time is None else arrival_time
        parent = ParentState(
            request_id=request_id, prompt=text, prompt_token_ids=token_ids,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            outputs=[CompletionOutput(index=i, text="", token_ids=[], cumulative_logprob=None,
                                      logprobs=None) for i in range(params.n)],
            child_ids=[request_id if params.n == 1 else f"{i}_{request_id}"
                       for i in range(params.n)],
            num_unfinished=params.n, metrics=RequestMetrics(arrival_time=arrival))
        stop_ids = frozenset(params.stop_token_ids or ()) | (
            frozenset() if params.ignore_eos else self.limits.eos_token_ids)
        children = [
            Request(request_id=child_id, prompt_token_ids=token_ids,
                    sampling_params=params.for_sample(i) if params.n > 1 else params,
                    max_tokens=max_tokens, stop_token_ids=stop_ids, arrival_time=arrival,
                    priority=priority, cache_salt=cache_salt,
                    grammar=None if grammar is None else grammar.matcher())
            for i, child_id in enumerate(parent.child_ids)]
        return PreparedRequest(parent=parent, children=children, params=params,
                               priority=priority)

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """What needs the model or tokenizer: logprobs=-1 as the vocabulary's size, bad
        words as token ids (each with and without a leading space, as vLLM)."""
        vocab = self.limits.vocab_size
        if ALL_LOGPROBS in (params.logprobs, params.prompt_logprobs):
            params = replace(params, **{name: vocab for name in ("logprobs", "prompt_logprobs")
                                        if getattr(params, name) == ALL_LOGPROBS})
        if params.bad_words and not params.bad_words_token_ids:
            spellings = {spelling for word in params.bad_words
                         for spelling in (word, word if word.startswith(" ") else " " + word)}
            params.bad_words_token_ids = [
                ids for ids in (self.tokenizer.encode(w, add_special_tokens=False)
                                for w in sorted(spellings)) if ids]
        return params

    def validate(self, token_ids: list[int], params: SamplingParams) -> int:
        """Checks a prompt against the model and the pool; returns the resolved max_tokens."""
        limits = self.limits
        if not token_ids:
            raise ParameterError("prompt", "the prompt is empty")
        vocab = limits.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ParameterError("prompt", f"prompt token ids must be integers in [0, {vocab}), "
                                           f"got {bad[:5]}")
        for token in params.logit_bias or {}:
            if not 0 <= token < vocab:
                raise ParameterError("logit_bias",
                                     f"logit_bias token id {token} is outside [0, {vocab})")
        for token in params.stop_token_ids or ():
            if not 0 <= token < vocab:
                raise ParameterError("stop_token_ids",
                                     f"stop_token_ids entry {token} is outside [0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            limit = limits.max_logprobs
            if limit != -1 and (getattr(params, name) or 0) > limit:
                raise ParameterError(name, f"{name}={getattr(params, name)} exceeds the "
                                           f"server's max_logprobs={limit}")
        for token in params.allowed_token_ids or ():
            if token >= vocab:
                raise ParameterError("allowed_token_ids", f"allowed_token_ids entry {token} is "
                                                          f"outside [0, {vocab})")
        if params.n > limits.max_num_seqs:
            raise ParameterError("n", f"n={params.n} exceeds max_num_seqs="
                                      f"{limits.max_num_seqs}")
        prompt_len = len(token_ids)
        max_model_len = limits.max_model_len
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = max_model_len - prompt_len
            if max_tokens < 1:
                raise ParameterError("prompt", f"the prompt has {prompt_len} tokens, which "
                                               f"leaves no room to generate within "
                                               f"max_model_len={max_model_len}")
        if prompt_len + max_tokens > max_model_len:
            raise ParameterError("max_tokens", f"the prompt ({prompt_len} tokens) plus "
                                               f"max_tokens ({max_tokens}) exceeds "
                                               f"max_model_len={max_model_len}")
        if cdiv(prompt_len + max_tokens, limits.block_size) > limits.num_usable_blocks:
            raise ParameterError("max_tokens", f"the request needs {prompt_len + max_tokens} "
                                               f"tokens of KV cache; the whole pool holds "
                                               f"{limits.kv_cache_tokens}")
        return max_tokens
