"""The Gemma family: Gemma 2 and Gemma 3 (text), over a paged KV cache.

What sets them apart from Llama: RMSNorm as (1 + w) in float32, norms on both sides of the
attention and of the MLP ("sandwich" norms), a GELU-tanh gated MLP, embeddings scaled by
sqrt(hidden_size) in the model's dtype, an attention scale from query_pre_attn_scalar, and
sliding-window layers between global ones. Gemma 2 soft-caps attention scores and final
logits; Gemma 3 adds q/k norms and a RoPE base per layer kind (local and global).

GGUF files (llama.cpp's gemma2 and gemma3) carry less than config.json; the readers below
fill the rest as llama.cpp's loader does (src/llama-model.cpp): the window pattern is fixed
per architecture, the attention scale follows from the model's size, and Gemma 2's soft
caps default to 50 and 30.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvflow.attention.metadata import AttentionMetadata
from kvflow.distributed.pipeline import Carry
from kvflow.layers.norm import GemmaRMSNorm
from kvflow.models.blocks import (Attention, CausalLM, GatedMLP, embedding, rotary_embeddings,
                                  decoder_layers, final_norm, run_decoder)
from kvflow.models.config import ModelConfig, RopeConfig, require
from kvflow.models.gguf.config import MAX_CONTEXT_LENGTH, read_gguf_config
from kvflow.models.gguf.file import GgufFile
from kvflow.models.gguf.layout import LLAMA_TENSORS, GgufLayout
from kvflow.models.registry import ModelFamily, register
from kvflow.quantization.base import QuantizationConfig

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def _read(hf: Any, path: Path, **fields: Any) -> ModelConfig:
    require(hf, "hidden_activation", _GELU_TANH)
    require(hf, "use_bidirectional_attention", (None, False))
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig.read_common(
        hf, path, hidden_act="gelu_tanh", qkv_bias=bias, o_bias=bias,
        attention_scale=float(hf.query_pre_attn_scalar) ** -0.5,
        attn_logit_softcap=getattr(hf, "attn_logit_softcapping", None) or None,
        final_logit_softcap=getattr(hf, "final_logit_softcapping", None) or None, **fields)


def read_gemma2(hf: Any, path: Path) -> ModelConfig:
    return _read(hf, path)


def read_gemma3(hf: Any, path: Path) -> ModelConfig:
    return _read(hf, path, qk_norm=True)


# llama.cpp's names for the sandwich norms; the q/k/v, output and MLP tensors are Llama's.
GEMMA_TENSORS = {**LLAMA_TENSORS, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}


def _gguf_attention_scale(config: ModelConfig, layers_of_27b: int) -> float:
    """llama.cpp stores no query_pre_attn_scalar: it takes the model's size from its layer
    count and, as Google's reference config does, scales queries by 1/sqrt(hidden / heads)
    on the 27B models and by 1/sqrt(head_dim) on the others."""
    if config.num_layers == layers_of_27b:
        return (config.hidden_size // config.num_heads) ** -0.5
    return config.head_dim ** -0.5


def _is_local(layer: int, period: int) -> bool:
    """llama.cpp's fixed pattern: the last layer of every `period` is global."""
    return layer % period < period - 1


def read_gemma2_gguf(file: GgufFile) -> ModelConfig:
    config = read_gguf_config(
        file, hidden_act="gelu_tanh", qk_norm=False,
        attn_logit_softcap=file.arch_float("attn_logit_softcapping", 50.0),
        final_logit_softcap=file.arch_float("final_logit_softcapping", 30.0))
    window = file.arch_int("attention.sliding_window", 1, MAX_CONTEXT_LENGTH, 4096)
    return replace(config, attention_scale=_gguf_attention_scale(config, 46),
                   sliding_windows=tuple(window if _is_local(i, 2) else None
                                         for i in range(config.num_layers)))


def read_gemma3_gguf(file: GgufFile) -> ModelConfig:
    """Without a window (llama.cpp's converter writes none for a config whose every layer
    is global) all layers are global. Local layers turn at base 10000 unscaled, as
    llama.cpp fixes it; kvflow reads rope.freq_base_swa where the file has it (the
    converter writes the config's local base there, 10000 in every Gemma 3)."""
    config = read_gguf_config(file, hidden_act="gelu_tanh", qk_norm=True,
                              final_logit_softcap=file.arch_float("final_logit_softcapping",
                                                                  None))
    config = replace(config, attention_scale=_gguf_attention_scale(config, 62))
    window = file.arch_int("attention.sliding_window", 0, MAX_CONTEXT_LENGTH, 0)
    if not window:
        return config
    local = RopeConfig(theta=file.arch_float("rope.freq_base_swa", 10000.0))
    layers = range(config.num_layers)
    ropes = tuple(local if _is_local(i, 6) else config.rope for i in layers)
    return replace(config, rope=ropes[0], layer_ropes=ropes,
                   sliding_windows=tuple(window if _is_local(i, 6) else None for i in layers))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: nn.Module,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        size, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx, rotary, quant_config, f"{prefix}.self_attn",
                                   norm=GemmaRMSNorm)
        self.mlp = GatedMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this layer's output, the residual stream before it), as Llama's layer: each
        residual add is fused with the pre-norm that follows it; the post-norms stand
        alone."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.embed_tokens = embedding(config)
        # The scale rounded to the model's dtype first, as Gemma's reference code does; a
        # buffer, so that a step makes no tensor from host data (a captured step could not).
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5),
                             persistent=False)
        rotaries = rotary_embeddings(config, max_positions)
        self.layers = decoder_layers(config, lambda i: GemmaDecoderLayer(
            config, i, rotaries[i], quant_config))
        self.norm = final_norm(config, lambda: GemmaRMSNorm(config.hidden_size,
                                                            config.rms_norm_eps))

    def forward(self, input_ids: torch.Tensor | None, meta: AttentionMetadata,
                carry: Carry | None = None) -> torch.Tensor | Carry:
        if carry is not None:
            return run_decoder(self.layers, self.norm, carry, meta)
        x = self.embed_tokens(input_ids)
        return run_decoder(self.layers, self.norm, x * self.embed_scale.to(x.dtype), meta)


class GemmaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, max_positions: int,
                 quant_config: QuantizationConfig | None = None,
                 lm_head_quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.model = GemmaModel(config, max_positions, quant_config)
        self.init_head(config, lm_head_quant_config)


# llama.cpp's converter adds 1 to every norm weight (its RMSNorm multiplies by w).
register(ModelFamily("Gemma2ForCausalLM", GemmaForCausalLM, read_gemma2,
                     GgufLayout("gemma2", read_gemma2_gguf, GEMMA_TENSORS, norm_shift=1.0)))
register(ModelFamily("Gemma3ForCausalLM", GemmaForCausalLM, read_gemma3,
                     GgufLayout("gemma3", read_gemma3_gguf, GEMMA_TENSORS, norm_shift=1.0)))
