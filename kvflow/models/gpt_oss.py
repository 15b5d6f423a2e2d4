"""gpt-oss: Llama's decoder with experts in every layer and attention sinks.

What sets it apart, read into the config: attention with biases and a learned sink logit
per head (kvflow/layers/attention.py), sliding-window layers (128 keys) between full ones
as `layer_types` says, YaRN RoPE, a router with a bias that takes the top-k of its logits
and a softmax over those, and experts with biases and a clamped SwiGLU
(kvflow/layers/activation.py).

Its checkpoints keep transformers' module layout: each projection of every expert stacked
and stored input-major ([experts, hidden, 2 * width] for gate and up, whose columns
alternate gate, up, gate, ...; [experts, width, hidden] for down). `checkpoint_tensors`
turns them into kvflow's [experts, rows, columns] with gate's rows before up's. OpenAI's
published checkpoints store the experts in MXFP4 (`gate_up_proj_blocks` and `_scales`,
output-major), which is expanded at load (kvflow/quantization/mxfp4.py) into the model's
dtype, or into int8 or int4 with --quantization.

GGUF files (llama.cpp's gpt-oss) hold the experts split into gate's, up's and down's
stacks, output-major (in MXFP4 as converted from OpenAI's checkpoints, dequantized at load
as other types kvflow's expert methods do not take), and say less than config.json; the
reader fills the rest as llama.cpp's loader does: even layers slide, the router's top-k
are softmaxed, the SwiGLU's alpha and limit are 1.702 and 7. YaRN keeps the band's ends
unrounded as gpt-oss's config.json asks (llama.cpp rounds them).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from kvflow.models.config import ModelConfig, MoeConfig, read_sliding_windows
from kvflow.models.gguf.config import MAX_CONTEXT_LENGTH, MAX_WIDTH, read_gguf_config
from kvflow.models.gguf.file import MAX_EXPERTS, GgufFile
from kvflow.models.gguf.layout import ATTENTION_TENSORS, GgufLayout, expert_tensors
from kvflow.models.llama import LlamaForCausalLM
from kvflow.models.registry import ModelFamily, register
from kvflow.quantization.mxfp4 import dequantize_mxfp4


def read_gpt_oss(hf: Any, path: Path) -> ModelConfig:
    layers = hf.num_hidden_layers
    moe = _gpt_oss_moe(hf.num_local_experts, hf.num_experts_per_tok, hf.intermediate_size,
                       layers, float(getattr(hf, "swiglu_limit", 7.0)),
                       float(getattr(hf, "swiglu_alpha", 1.702)))
    bias = bool(getattr(hf, "attention_bias", True))
    quantization = getattr(hf, "quantization_config", None) or {}
    if quantization and quantization.get("quant_method") != "mxfp4":
        raise ValueError(f"GptOssConfig quantization_config.quant_method "
                         f"{quantization.get('quant_method')!r} is not implemented by kvflow; "
                         "implemented: 'mxfp4' (the experts, expanded at load)")
    return ModelConfig.read_common(hf, path, qkv_bias=bias, o_bias=bias, moe=moe,
                                   attention_sinks=True, quantization=None,
                                   sliding_windows=read_sliding_windows(hf, layers))


def _gpt_oss_moe(num_experts: int, top_k: int, width: int, layers: int, limit: float,
                 alpha: float) -> MoeConfig:
    return MoeConfig(num_experts=num_experts, top_k=top_k, intermediate_size=width,
                     norm_topk_prob=True, sparse_layers=(True,) * layers,
                     scoring="topk_softmax", router_bias=True, expert_bias=True,
                     swiglu_limit=limit, swiglu_alpha=alpha)


def read_gpt_oss_gguf(file: GgufFile) -> ModelConfig:
    config = read_gguf_config(file, attention_sinks=True)
    num_experts = file.arch_int("expert_count", 1, MAX_EXPERTS)
    top_k = file.arch_int("expert_used_count", 1, num_experts,
                          reason=f", as the file has {num_experts} experts")
    width = file.arch_int("expert_feed_forward_length", 1, MAX_WIDTH)
    window = file.arch_int("attention.sliding_window", 1, MAX_CONTEXT_LENGTH)
    layers = config.num_layers
    rope = (replace(config.rope, truncate=False) if config.rope.scaling_type == "yarn"
            else config.rope)
    return replace(config, rope=rope, layer_ropes=(rope,) * layers,
                   moe=_gpt_oss_moe(num_experts, top_k, width, layers, 7.0, 1.702),
                   sliding_windows=tuple(window if i % 2 == 0 else None
                                         for i in range(layers)))


def _gate_then_up(alternating: torch.Tensor, dim: int) -> torch.Tensor:
    """Entries along `dim` alternating gate, up -> gate's, then up's."""
    pairs = alternating.unflatten(dim, (-1, 2))
    return torch.cat([pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)], dim=dim)


_MXFP4_PARTS = ("_blocks", "_scales")


def _mxfp4_projection(key: str) -> tuple[str, str] | None:
    """(the projection's name, "_blocks" or "_scales") of an expert's MXFP4 tensor."""
    for part in _MXFP4_PARTS:
        if ".mlp.experts." in key and key.endswith(part):
            return key.removesuffix(part), part
    return None


class GptOssForCausalLM(LlamaForCausalLM):
    # a GGUF file's stacks (kvflow/models/gguf/layout.py); checkpoints fuse gate and up
    expert_projections: ClassVar[dict[str, str]] = {
        "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    @classmethod
    def checkpoint_tensors(cls, tensors: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors:
            mxfp4 = _mxfp4_projection(key)
            if mxfp4 is None:
                yield cls._adapted(key, tensor)
                continue
            name, part = mxfp4
            parts = pending.setdefault(name, {})
            parts[part] = tensor
            if len(parts) == 2:
                del pending[name]
                # output-major, as kvflow stores it already
                weight = dequantize_mxfp4(parts["_blocks"], parts["_scales"])
                yield name, (_gate_then_up(weight, 1) if name.endswith(".gate_up_proj")
                             else weight)
        if pending:
            name, parts = next(iter(pending.items()))
            missing = next(p for p in _MXFP4_PARTS if p not in parts)
            raise ValueError(f"checkpoint has {name}{next(iter(parts))} without {name}{missing}")

    @staticmethod
    def _adapted(key: str, tensor: Any) -> tuple[str, Any]:
        if key.endswith((".self_attn.sinks", ".self_attn.sinks.weight")):  # GGUF: a weight
            return key[:key.index(".self_attn.sinks")] + ".self_attn.attn.sinks", tensor
        if ".mlp.router." in key:
            return key.replace(".mlp.router.", ".mlp.gate."), tensor
        if key.endswith(".mlp.experts.gate_up_proj"):  # input-major
            return key, _gate_then_up(tensor, 2).transpose(1, 2)
        if key.endswith(".mlp.experts.gate_up_proj_bias"):
            return key, _gate_then_up(tensor, 1)
        if key.endswith(".mlp.experts.down_proj"):
            return key, tensor.transpose(1, 2)
        return key, tensor


# llama.cpp's names: Llama's attention, a post-attention norm of its own name, the sinks,
# and the expert layer's tensors, every layer.
_GGUF_TENSORS = {**{k: v for k, v in ATTENTION_TENSORS.items() if k != "ffn_norm"},
                 "post_attention_norm": "post_attention_layernorm",
                 "attn_sinks": "self_attn.sinks",
                 **expert_tensors("mlp", GptOssForCausalLM.expert_projections)}
register(ModelFamily("GptOssForCausalLM", GptOssForCausalLM, read_gpt_oss,
                     GgufLayout("gpt-oss", read_gpt_oss_gguf, _GGUF_TENSORS, has_experts=True)))
