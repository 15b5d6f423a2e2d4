"""Phi-3, Phi-3.5 and Phi-4-mini: Llama's decoder with checkpoints whose q/k/v and
gate/up projections are stored fused (loaded whole into kvflow's fused layers), LongRoPE
(short and long factors, kvflow/layers/rotary.py) and, on Phi-4-mini, a partial rotary."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from kvflow.models.config import ModelConfig, require
from kvflow.models.llama import LlamaForCausalLM
from kvflow.models.registry import ModelFamily, register


def read_phi3(hf: Any, path: Path) -> ModelConfig:
    require(hf, "hidden_act", ("silu",))
    params = getattr(hf, "rope_parameters", None) or {}
    factor = float(params.get("partial_rotary_factor",
                              getattr(hf, "partial_rotary_factor", None) or 1.0))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rotary_dim = int(head_dim * factor)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"Phi3Config field partial_rotary_factor={factor} gives a rotary "
                         f"of {rotary_dim} dims of a {head_dim}-dim head; kvflow needs an "
                         "even number from 2 to the head size")
    return ModelConfig.read_common(hf, path, rotary_dim=rotary_dim)


class Phi3ForCausalLM(LlamaForCausalLM):
    packed_modules: ClassVar[dict[str, tuple[str, str]]] = {}  # the checkpoint is fused


register(ModelFamily("Phi3ForCausalLM", Phi3ForCausalLM, read_phi3))
