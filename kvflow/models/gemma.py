"""The Gemma family: Gemma 2 and Gemma 3 (text), over a paged KV cache.

What sets them apart from Llama: RMSNorm as (1 + w) in float32, norms on both sides of the
attention and of the MLP ("sandwich" norms), a GELU-tanh gated MLP, embeddings scaled by
sqrt(hidden_size) in the model's dtype, an attention scale from query_pre_attn_scalar, and
sliding-window layers between global ones. Gemma 2 soft-caps attention scores and final
logits; Gemma 3 adds q/k norms and a RoPE base per layer kind (local and global).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvflow.attention.metadata import AttentionMetadata
from kvflow.layers.norm import GemmaRMSNorm
from kvflow.models.blocks import Attention, CausalLM, GatedMLP, embedding, rotary_embeddings
from kvflow.models.config import ModelConfig, require
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
        self.embed_scale = config.hidden_size ** 0.5
        rotaries = rotary_embeddings(config, max_positions)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i, rotaries[i], quant_config)
                                    for i in range(config.num_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # The scale rounded to the model's dtype first, as Gemma's reference code does.
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, meta)
        return self.norm(x, residual)[0]


class GemmaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, max_positions: int,
                 quant_config: QuantizationConfig | None = None,
                 lm_head_quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.model = GemmaModel(config, max_positions, quant_config)
        self.init_head(config, lm_head_quant_config)


register(ModelFamily("Gemma2ForCausalLM", GemmaForCausalLM, read_gemma2))
register(ModelFamily("Gemma3ForCausalLM", GemmaForCausalLM, read_gemma3))
