"""Weight formats for linear layers, each a `LinearMethod` (see base.py)."""
from __future__ import annotations

from kvflow.quantization.base import QuantizationConfig
from kvflow.quantization.gptq_awq import QUANT_METHODS, CheckpointFormatConfig
from kvflow.quantization.int4 import Int4Config
from kvflow.quantization.int8 import Int8Config

QUANTIZATIONS = ("int8", "int4")


def quantization_config(name: str | None, group_size: int) -> QuantizationConfig | None:
    """The config for --quantization (None: unquantized, or whatever the checkpoint is);
    group_size applies to int4."""
    if name is None:
        return None
    if name == "int8":
        return Int8Config()
    if name == "int4":
        return Int4Config(group_size)
    if name in QUANT_METHODS:
        return CheckpointFormatConfig(name)
    raise ValueError(
        f"quantization={name!r} is not supported: kvflow quantizes a bf16, fp16 or fp32 "
        f"checkpoint at load with {' or '.join(repr(q) for q in QUANTIZATIONS)} (weight-only; "
        "the embedding and LM head stay in the checkpoint's dtype); GPTQ and AWQ checkpoints "
        "and GGUF files load in their own formats with no flag ('gptq' and 'awq' are "
        "accepted where they match the checkpoint); fp8 checkpoints are not loaded yet")
