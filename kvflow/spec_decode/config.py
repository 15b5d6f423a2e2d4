"""Speculative decoding's configuration, in vLLM's --speculative-config spelling."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvflow.config import parse_json_object

METHODS = ("ngram", "draft_model")
# vLLM methods kvflow lacks, with the reason.
_OTHER_METHODS = {
    "eagle": "EAGLE heads are not supported; use a draft model (method draft_model)",
    "eagle3": "EAGLE heads are not supported; use a draft model (method draft_model)",
    "medusa": "Medusa heads are not supported; use a draft model (method draft_model)",
    "mlp_speculator": "MLP speculators are not supported; use a draft model",
    "deepseek_mtp": "multi-token-prediction heads are not supported",
    "mtp": "multi-token-prediction heads are not supported",
}
# Both defaults were measured on the demo model with its draft on a 2-core Xeon
# (docs/benchmarks.md, "Speculative decoding"); a target whose forward is dominated by
# weight reads rather than per-step overhead verifies drafts for less, and may raise the
# first and lower the second.
# Speculation stops paying once the batch keeps the machine busy without it: there, one
# request gained up to 29% and two requests gained nothing (prompt lookup) or lost 10-29%
# (the draft): batching the second request nearly doubled throughput, which is the spare
# capacity verification had been using.
DEFAULT_DISABLE_BY_BATCH_SIZE = 1
# A request whose drafts are accepted less often than this (per draft token, after
# MIN_VERIFIED_DRAFTS of them) stops proposing: they cost more than they give. Break-even
# is (c - 1) / k, with c the cost of a step verifying k drafts in plain steps: measured
# c = 1.85 for prompt lookup with k = 4 (0.21), and for the demo draft with k = 2, whose
# own forwards it includes, 1.9 greedy and 2.1 at temperature 0.8 (0.45 and 0.56).
DEFAULT_MIN_ACCEPTANCE_RATE = {"ngram": 0.2, "draft_model": 0.5}
MIN_VERIFIED_DRAFTS = 16
# vLLM's default n-gram window when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # one of METHODS
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None  # ngram: shortest suffix matched
    prompt_lookup_max: int | None = None  # ngram: longest suffix matched
    model: str | None = None  # draft_model: the draft checkpoint (local directory or hub id)
    # Speculation is off for steps with more requests than this (None: never off).
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE
    # None: the method's default (DEFAULT_MIN_ACCEPTANCE_RATE)
    min_acceptance_rate: float | None = None

    def __post_init__(self) -> None:
        if self.method in _OTHER_METHODS:
            raise ValueError(f"speculative_config method {self.method!r}: "
                             f"{_OTHER_METHODS[self.method]}")
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {METHODS}, "
                             f"got {self.method!r}")
        if (not isinstance(self.num_speculative_tokens, int)
                or not 1 <= self.num_speculative_tokens <= 32):
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer "
                             f"in [1, 32], got {self.num_speculative_tokens!r}")
        if self.method == "ngram":
            low = self.prompt_lookup_min or self.prompt_lookup_max or DEFAULT_PROMPT_LOOKUP
            high = self.prompt_lookup_max or low
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
                raise ValueError(f"speculative_config needs 1 <= prompt_lookup_min <= "
                                 f"prompt_lookup_max, got {low!r} and {high!r}")
            object.__setattr__(self, "prompt_lookup_min", low)
            object.__setattr__(self, "prompt_lookup_max", high)
            if self.model is not None:
                raise ValueError("speculative_config method 'ngram' takes no model")
        elif not self.model:
            raise ValueError("speculative_config method 'draft_model' needs a model (the "
                             "draft checkpoint's directory or hub id)")
        limit = self.disable_by_batch_size
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"speculative_config disable_by_batch_size must be at least 1, "
                             f"got {self.disable_by_batch_size}")
        if self.min_acceptance_rate is None:
            object.__setattr__(self, "min_acceptance_rate",
                               DEFAULT_MIN_ACCEPTANCE_RATE[self.method])
        rate = self.min_acceptance_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"speculative_config min_acceptance_rate must be in [0, 1], "
                             f"got {self.min_acceptance_rate}")

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        """From a JSON object (the command line) or a dict (LLM(speculative_config=...)).
        As in vLLM, a model with no method means draft_model, and "[ngram]" means ngram."""
        if isinstance(value, SpeculativeConfig):
            return value
        value = parse_json_object(value, "speculative_config")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; kvflow takes "
                             f"{sorted(fields)}")
        options = dict(value)
        if options.get("model") == "[ngram]":
            options["method"], options["model"] = "ngram", None
        options.setdefault("method", "draft_model" if options.get("model") else None)
        if "num_speculative_tokens" not in options:
            raise ValueError("speculative_config needs num_speculative_tokens")
        return cls(**options)
