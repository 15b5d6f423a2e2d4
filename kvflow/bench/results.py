"""One system's run of one workload, as plain data every report reads."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RunResult:
    system: str
    workload: str
    num_requests: int
    seconds: float
    prompt_tokens: int
    generated_tokens: int
    settings: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    roofline: dict = field(default_factory=dict)

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "requests_per_s": self.num_requests / self.seconds,
                "prompt_tokens_per_s": self.prompt_tokens / self.seconds,
                "generated_tokens_per_s": self.generated_tokens_per_s,
                "total_tokens_per_s": (self.prompt_tokens + self.generated_tokens)
                / self.seconds}


def distribution(values_s: list[float]) -> dict:
    """Mean and p50/p90/p99 in milliseconds (empty when there are no values)."""
    if not values_s:
        return {}
    ms = np.asarray(values_s) * 1000
    return {"mean_ms": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "count": int(ms.size)}


def samples_ms(values_s: list[float]) -> list[float]:
    """Raw samples for the distribution plots, rounded to 10 microseconds."""
    return [round(v * 1000, 2) for v in values_s]
