"""The Llama family: Llama, Mistral, Qwen2 and Qwen3, one decoder over a paged KV cache.

Reads top to bottom: the config readers (what sets the four apart: biases, Qwen3's
per-head q/k RMSNorm, Mistral's window on every layer), DecoderLayer, Model, ForCausalLM,
and the registry entries. Inputs are flat token batches; `AttentionMetadata` says where
each token sits and where its KV goes. The mixture-of-experts families (moe.py) run this
decoder with experts in place of the MLP where their config has them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kvflow.attention.metadata import AttentionMetadata
from kvflow.distributed.pipeline import Carry
from kvflow.layers.norm import RMSNorm
from kvflow.models.blocks import (Attention, CausalLM, embedding, feed_forward, rotary_embeddings,
                                  decoder_layers, final_norm, run_decoder)
from kvflow.models.config import ModelConfig, read_sliding_windows, require
from kvflow.models.gguf.config import read_gguf_config
from kvflow.models.gguf.layout import GgufLayout
from kvflow.models.registry import ModelFamily, register
from kvflow.quantization.base import QuantizationConfig


def _read(hf: Any, path: Path, **fields: Any) -> ModelConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    return ModelConfig.read_common(hf, path, **fields)


def read_llama(hf: Any, path: Path) -> ModelConfig:
    bias = bool(getattr(hf, "attention_bias", False))
    return _read(hf, path, qkv_bias=bias, o_bias=bias,
                 mlp_bias=bool(getattr(hf, "mlp_bias", False)))


def read_mistral(hf: Any, path: Path) -> ModelConfig:
    return _read(hf, path, sliding_windows=read_sliding_windows(hf, hf.num_hidden_layers,
                                                                every_layer=True))


def read_qwen2(hf: Any, path: Path) -> ModelConfig:
    return _read(hf, path, qkv_bias=True)


def read_qwen3(hf: Any, path: Path) -> ModelConfig:
    bias = bool(getattr(hf, "attention_bias", False))
    return _read(hf, path, qkv_bias=bias, o_bias=bias, qk_norm=True)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: nn.Module,
                 quant_config: QuantizationConfig | None, feed_forward_name: str) -> None:
        """feed_forward_name: what checkpoints call the MLP (or the experts in its place)."""
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.self_attn = Attention(config, layer_idx, rotary, quant_config, f"{prefix}.self_attn")
        self.feed_forward_name = feed_forward_name
        self.add_module(feed_forward_name, feed_forward(config, layer_idx, quant_config,
                                                        f"{prefix}.{feed_forward_name}"))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this layer's output, the residual stream before it): the next norm adds them,
        so that each residual add is fused with the norm that follows it."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return getattr(self, self.feed_forward_name)(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int,
                 quant_config: QuantizationConfig | None, feed_forward_name: str) -> None:
        super().__init__()
        self.embed_tokens = embedding(config)
        rotaries = rotary_embeddings(config, max_positions)
        self.layers = decoder_layers(config, lambda i: DecoderLayer(
            config, i, rotaries[i], quant_config, feed_forward_name))
        self.norm = final_norm(config, lambda: RMSNorm(config.hidden_size, config.rms_norm_eps))

    def forward(self, input_ids: torch.Tensor | None, meta: AttentionMetadata,
                carry: Carry | None = None) -> torch.Tensor | Carry:
        return run_decoder(self.layers, self.norm,
                           carry if carry is not None else self.embed_tokens(input_ids), meta)


class LlamaForCausalLM(CausalLM):
    # what checkpoints call each layer's MLP, or the experts in its place (Mixtral's
    # block_sparse_moe)
    feed_forward_name: ClassVar[str] = "mlp"

    def __init__(self, config: ModelConfig, max_positions: int,
                 quant_config: QuantizationConfig | None = None,
                 lm_head_quant_config: QuantizationConfig | None = None) -> None:
        """quant_config: the format of the decoder layers' linear weights (None: the model's
        dtype); lm_head_quant_config: the LM head's."""
        super().__init__()
        self.model = LlamaModel(config, max_positions, quant_config, self.feed_forward_name)
        self.init_head(config, lm_head_quant_config)


# GGUF files keep the Llama layout; Mistral 7B's are written as "llama".
register(ModelFamily("LlamaForCausalLM", LlamaForCausalLM, read_llama,
                     GgufLayout("llama", read_gguf_config, permuted_qk=True)))
register(ModelFamily("MistralForCausalLM", LlamaForCausalLM, read_mistral))
register(ModelFamily("Qwen2ForCausalLM", LlamaForCausalLM, read_qwen2,
                     GgufLayout("qwen2", read_gguf_config)))
register(ModelFamily("Qwen3ForCausalLM", LlamaForCausalLM, read_qwen3,
                     GgufLayout("qwen3", read_gguf_config)))
