"""Phi-3, Phi-3.5 and Phi-4-mini: Llama's decoder with checkpoints whose q/k/v and
gate/up projections are stored fused (loaded whole into kvflow's fused layers), LongRoPE
(short and long factors, kvflow/layers/rotary.py) and, on Phi-4-mini, a partial rotary.

llama.cpp's phi3 files keep the fused tensors (attn_qkv, and ffn_up holding gate then up),
the rotary's width (rope.dimension_count) and LongRoPE's factors as tensors, all of which
the common GGUF reader takes. llama.cpp ignores a Phi-3 file's sliding_window (its
loader says the converter does not record the window pattern); kvflow applies it to every
layer, as transformers and kvflow's Phi-3 checkpoints do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from kvflow.models.config import ModelConfig, require
from kvflow.models.gguf.config import read_gguf_config
from kvflow.models.gguf.layout import GgufLayout
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


PHI3_TENSORS = {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj",
                "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}

register(ModelFamily("Phi3ForCausalLM", Phi3ForCausalLM, read_phi3,
                     GgufLayout("phi3", read_gguf_config, PHI3_TENSORS)))
