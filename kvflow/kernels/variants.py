"""How the native GEMVs read a weight, and the variants the per-machine tuning tries.

The best way to stream a weight from memory differs between microarchitectures: four rows
side by side with a software prefetch 4 KiB ahead suited a 2-core Zen 5, while on a 2-core
Zen 4 the hardware prefetcher kept up with one sequential stream per thread and not with
four (kvflow/kernels/csrc/cpu_ops.cpp, GemvVariant). kvflow/kernels/tuning.py times each
variant on the model's own weights and keeps the fastest per shape."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GemvVariant:
    streams: int = 4  # weight rows read side by side per thread: 4, or 1 (one after another)
    prefetch: int = 4096  # bytes ahead of each stream to prefetch; 0: none

    def __str__(self) -> str:
        return f"streams={self.streams} prefetch={self.prefetch}"

    @classmethod
    def parse(cls, text: str) -> GemvVariant:
        """The variant str() wrote."""
        match = re.fullmatch(r"streams=(\d+) prefetch=(\d+)", text)
        if match is None:
            raise ValueError(f"not a GEMV variant: {text!r}")
        return cls(int(match[1]), int(match[2]))


DEFAULT = GemvVariant()
# Tried per shape: the default, and one sequential stream with and without a prefetch.
CANDIDATES = (DEFAULT, GemvVariant(1, 0), GemvVariant(1, 512))
