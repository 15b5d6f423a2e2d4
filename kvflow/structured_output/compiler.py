"""Constraints compiled with llguidance, once per distinct (kind, spec,
reasoning tags), and cached.

Compilation runs where a request is prepared (LLMatcher drops the GIL while it builds), so
a bad schema is refused before the request reaches the engine thread and a slow one never
stalls a step; limits.py bounds what reaches llguidance and gives it a stack to match. docs/architecture.md says why llguidance and not xgrammar.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable

import llguidance
import llguidance.hf
from transformers import PreTrainedTokenizerBase

from kvflow.sampling_params import ParameterError, StructuredOutputsParams
from kvflow.structured_output.limits import check_constraint, on_compile_stack
from kvflow.structured_output.matcher import RequestGrammar
from kvflow.structured_output.reasoning import AfterReasoning, after_reasoning_grammar
from kvflow.structured_output.schema_rules import check_schema

# JSON is written with ", " and ": " between items and no other whitespace: with free
# whitespace a weak model can spend its whole budget on newlines, and the output parses
# the same.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A schema keyword llguidance does not implement is an error, never ignored.
JSON_STRICT = {"lenient": False}
MAX_CACHED_GRAMMARS = 256
MAX_ERROR_CHARS = 500

_DESCRIPTIONS = {"json": "JSON schema", "json_object": "JSON object constraint",
                 "regex": "regular expression", "choice": "choice", "grammar": "grammar"}


class CompiledGrammar:
    """A compiled constraint; each sequence that follows it gets its own matcher."""

    def __init__(self, template: llguidance.LLMatcher) -> None:
        self._template = template  # never advanced: only copied

    def matcher(self) -> RequestGrammar:
        return RequestGrammar(self._template.deep_copy(), group=self)


class GrammarCompiler:
    """Thread-safe: requests are prepared on several threads. The llguidance tokenizer is
    built on first use (about 1.5 s for a 150k-token vocabulary), so engines that never see
    a constrained request never pay for it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                 eos_token_ids: Iterable[int], max_cached: int = MAX_CACHED_GRAMMARS) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's: masks cover every logit
        self._eos_token_ids = sorted(eos_token_ids)
        self.max_cached = max_cached
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str | None, ...], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size,
                    eos_token=self._eos_token_ids or None)
            return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """Raises ParameterError("structured_outputs", ...) for a constraint that cannot be
        compiled or uses a feature llguidance does not implement."""
        key = (params.kind, params.spec, *_reasoning_tags(params))
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = CompiledGrammar(self._build(params))
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return compiled

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def _build(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        what = _DESCRIPTIONS[params.kind]
        check_constraint(params)
        if params.kind == "json":
            check_schema(params.json)
        tokenizer = self._tokenizer()
        try:
            matcher, refusal = on_compile_stack(lambda: _compile(tokenizer, params))
        except ValueError as exc:
            raise ParameterError("structured_outputs", f"the {what} cannot be compiled: "
                                 f"{_shorten(str(exc))}") from None
        if refusal is not None:
            raise ParameterError("structured_outputs", f"the {what} {refusal}")
        return matcher


def _compile(tokenizer: llguidance.LLTokenizer, params: StructuredOutputsParams
             ) -> tuple[llguidance.LLMatcher, str | None]:
    """The matcher of a constraint, and why it is refused, if it is.

    llguidance builds a grammar's lexer at its first mask, not when it compiles, and every
    copy of a matcher shares its lexer. One past llguidance's limits (a regex such as
    (a{1000}){1000}) spends all its fuel in that first mask and fails at the next: the
    first copy's mask builds it, the second's fails, and the constraint is refused here
    instead of failing its request after a token or two. Real requests then find the lexer
    built: the engine thread does not pay for it."""
    matcher = llguidance.LLMatcher(tokenizer, _grammar_text(params), log_level=0)
    if matcher.is_error():
        return matcher, f"cannot be compiled: {_shorten(matcher.get_error())}"
    for _ in range(2):
        probe = matcher.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            return matcher, ("is too complex for the matcher's limits "
                             f"({probe.get_error().splitlines()[0]})")
    return matcher, None


def _reasoning_tags(params: StructuredOutputsParams) -> tuple[str | None, ...]:
    if isinstance(params, AfterReasoning):
        return params.reasoning_start, params.reasoning_end
    return ()


def _grammar_text(params: StructuredOutputsParams) -> str:
    """llguidance's grammar for the constraint; raises ValueError where it cannot parse it."""
    answer = _answer_grammar_text(params)
    if isinstance(params, AfterReasoning):
        return after_reasoning_grammar(answer, params.reasoning_start, params.reasoning_end)
    return answer


def _answer_grammar_text(params: StructuredOutputsParams) -> str:
    if params.kind in ("json", "json_object"):
        schema = params.json if params.kind == "json" else {"type": "object"}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT,
                                                             overrides=JSON_STRICT)
    if params.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if params.kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(params.choice))
    return llguidance.grammar_from("grammar", params.grammar)  # Lark or GBNF


def _shorten(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "..."
