"""Per-request sampling parameters, with vLLM's names and validation rules."""
from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from kvflow import json_depth

if TYPE_CHECKING:
    import torch

MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes

MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
# Each entry costs every step of the request a little; the caps keep one request from
# slowing the whole batch. OpenAI documents 300 logit_bias entries; tokenizer-wide bans
# (every token but a few) belong to structured output, not to logit_bias.
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_ALLOWED_TOKEN_IDS = 1024
MAX_BAD_WORDS = 128
# Stop strings are searched for in each step's new text, each from as far back as it is
# long: 100,000 of them made every other stream 7 times slower.
MAX_STOP_STRINGS = 128
MAX_STOP_CHARS = 4096  # all of them together
ALL_LOGPROBS = -1  # logprobs=-1: the whole vocabulary (as vLLM), within max_logprobs


class ParameterError(ValueError):
    """A request field with a bad value; `param` names it (the server's error body says it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# Each kind of structured output: (is its value valid, what it must be).
_STRUCTURED_OUTPUT_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "json": (lambda v: isinstance(v, dict), "a JSON schema object"),
    "regex": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "choice": (lambda v: isinstance(v, list) and v != [] and all(
        isinstance(c, str) and c != "" for c in v), "a non-empty list of non-empty strings"),
    "grammar": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "json_object": (lambda v: v is True, "true"),
}
STRUCTURED_OUTPUT_KINDS = tuple(_STRUCTURED_OUTPUT_RULES)


@dataclass
class StructuredOutputsParams:
    """What a request's output must match, as vLLM's: exactly one of a JSON schema (`json`, a
    dict or its JSON text), any JSON object (`json_object=True`), a regular expression that
    the whole output matches, one of the strings in `choice`, or a grammar (Lark or GBNF).
    The engine compiles it when the request is added; one it cannot honour is refused."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [name for name in STRUCTURED_OUTPUT_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ParameterError("structured_outputs", "structured_outputs takes exactly one of "
                                 f"{', '.join(STRUCTURED_OUTPUT_KINDS)}; got "
                                 f"{', '.join(given) or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json_depth.loads(self.json)
            except json_depth.TooDeepError as exc:
                raise ParameterError("structured_outputs",
                                     f"structured_outputs.json {exc}") from None
            except ValueError as exc:
                raise ParameterError("structured_outputs",
                                     f"structured_outputs.json is not valid JSON: {exc}") from None
        is_valid, expected = _STRUCTURED_OUTPUT_RULES[self.kind]
        if not is_valid(getattr(self, self.kind)):
            raise ParameterError("structured_outputs",
                                 f"structured_outputs.{self.kind} must be {expected}")

    @property
    def kind(self) -> str:
        return next(name for name in STRUCTURED_OUTPUT_KINDS if getattr(self, name) is not None)

    @property
    def spec(self) -> str:
        """The constraint as text, the same for equal constraints (a key for compiled ones)."""
        value = getattr(self, self.kind)
        if isinstance(value, str):
            return value
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    # None: whatever the context window leaves; 0: the prompt alone (its prompt_logprobs,
    # or the completions API's echo), with no token generated.
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # False is refused: fast tokenizers lack it
    detokenize: bool = True  # False: token ids only, no text
    allowed_token_ids: list[int] | None = None  # sample only among these
    bad_words: list[str] | None = None  # never generate these words
    structured_outputs: StructuredOutputsParams | None = None  # what the output must match
    # Keep only the prompt's last k tokens (-1: the last max_model_len), as vLLM.
    truncate_prompt_tokens: int | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False)
    # Set by the engine, which has the tokenizer: each bad word as token ids, with and
    # without a leading space, as vLLM.
    bad_words_token_ids: list[list[int]] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        try:
            self._validate()
        except ValueError as exc:
            # Every message starts with the name of the field it is about.
            raise ParameterError(re.match(r"\w+", str(exc)).group(), str(exc)) from None

    def _validate(self) -> None:
        self._check_types()
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        # Bounded away from 0: a tiny penalty divides logits into infinities (or is 0 once
        # cast to float32), and one row of infinities would sample garbage.
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, "
                             f"{MAX_REPETITION_PENALTY}], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED - (self.n - 1):
            raise ValueError(f"seed must be in [0, {MAX_SEED - (self.n - 1)}] (n={self.n} samples "
                             f"use seed + i), got {self.seed}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens must be non-negative, got {self.max_tokens}")
        if self.truncate_prompt_tokens is not None and not (
                self.truncate_prompt_tokens == -1 or self.truncate_prompt_tokens >= 1):
            raise ValueError("truncate_prompt_tokens must be -1 (max_model_len) or at least 1, "
                             f"got {self.truncate_prompt_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            # The upper bound is the engine's max_logprobs (20 unless raised).
            if value is not None and value < ALL_LOGPROBS:
                raise ValueError(f"{name} must be -1 (the whole vocabulary) or at least 0, "
                                 f"got {value}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(stops)} entries; at most {MAX_STOP_STRINGS} "
                             "are allowed")
        if sum(map(len, stops)) > MAX_STOP_CHARS:
            raise ValueError(f"stop has {sum(map(len, stops))} characters; at most "
                             f"{MAX_STOP_CHARS} are allowed")
        self.stop_strings = tuple(stops)
        if self.stop_token_ids is not None:
            if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
                raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} entries; at most "
                                 f"{MAX_STOP_TOKEN_IDS} are allowed")
            if any(t < 0 for t in self.stop_token_ids):
                raise ValueError(f"stop_token_ids must be non-negative, got "
                                 f"{self.stop_token_ids[:5]}")
        if not self.spaces_between_special_tokens:
            raise ValueError("spaces_between_special_tokens=False is not supported: kvflow "
                             "decodes with fast tokenizers, which do not add those spaces")
        if not self.detokenize and stops:
            raise ValueError("detokenize=False leaves no text to find stop strings in; use "
                             "stop_token_ids")
        if self.allowed_token_ids is not None:
            if len(self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS:
                raise ValueError(f"allowed_token_ids has {len(self.allowed_token_ids)} "
                                 f"entries; at most {MAX_ALLOWED_TOKEN_IDS} are allowed (a "
                                 "larger set is a job for structured output)")
            if not self.allowed_token_ids or any(
                    isinstance(t, bool) or not isinstance(t, int) or t < 0
                    for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids must be a non-empty list of token ids")
        if self.bad_words is not None:
            if len(self.bad_words) > MAX_BAD_WORDS:
                raise ValueError(f"bad_words has {len(self.bad_words)} entries; at most "
                                 f"{MAX_BAD_WORDS} are allowed")
            if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
                raise ValueError("bad_words must be non-empty strings")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")
        if self.logit_bias and len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most "
                             f"{MAX_LOGIT_BIAS_TOKENS} are allowed")
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            for token, bias in self.logit_bias.items():
                if not -100.0 <= bias <= 100.0:  # also refuses NaN
                    raise ValueError(f"logit_bias for token {token} must be in [-100, 100], got {bias}")

    def _check_types(self) -> None:
        ints = ("n", "top_k", "min_tokens")
        optional_ints = ("seed", "max_tokens", "logprobs", "prompt_logprobs",
                         "truncate_prompt_tokens")
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
        for name in ints + optional_ints:
            value = getattr(self, name)
            if value is None and name in optional_ints:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @cached_property
    def logit_bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token ids, biases) on the CPU, built once per request: the sampler concatenates
        them every step, which costs no Python per entry."""
        if not self.logit_bias:
            return None
        import torch

        return (torch.tensor(list(self.logit_bias), dtype=torch.int64),
                torch.tensor(list(self.logit_bias.values()), dtype=torch.float32))

    @cached_property
    def allowed_token_tensor(self) -> torch.Tensor | None:
        """allowed_token_ids as a tensor, built once per request."""
        if self.allowed_token_ids is None:
            return None
        import torch

        return torch.tensor(sorted(set(self.allowed_token_ids)), dtype=torch.int64)

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's name)."""
        return copy.deepcopy(self)

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of the index-th of n samples: one sequence each, seeds kept distinct.
        The samples share this request's logit_bias tensors."""
        seed = None if self.seed is None else self.seed + index
        sample = replace(self, n=1, seed=seed)
        sample.__dict__["logit_bias_tensors"] = self.logit_bias_tensors
        sample.__dict__["allowed_token_tensor"] = self.allowed_token_tensor
        sample.bad_words_token_ids = self.bad_words_token_ids
        return sample
