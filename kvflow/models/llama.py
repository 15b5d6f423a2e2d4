"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Reads top to bottom: Attention, MLP, DecoderLayer, Model, ForCausalLM. Inputs are
flat token batches; `AttentionMetadata` says where each token sits and where its KV goes.
"""
from __future__ import annotations

import torch
from torch import nn

from kvflow.attention.metadata import AttentionMetadata
from kvflow.models.config import ModelConfig
from kvflow.layers.activation import SiluAndMul
from kvflow.layers.attention import PagedAttention
from kvflow.layers.linear import Linear, MergedLinear
from kvflow.layers.norm import RMSNorm
from kvflow.layers.rotary import RotaryEmbedding
from kvflow.quantization.base import QuantizationConfig, QuantizedPlan
from kvflow.quantization.unquantized import LinearPlan, apply_linear


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        prefix = f"model.layers.{layer_idx}.self_attn"
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size},
                                     bias=config.qkv_bias, quant_config=quant_config,
                                     prefix=f"{prefix}.qkv_proj")
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_bias,
                             quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(config.num_heads, config.num_kv_heads, config.head_dim,
                                   config.sliding_windows[layer_idx])

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(meta.positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta).flatten(1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        size = config.intermediate_size
        prefix = f"model.layers.{layer_idx}.mlp"
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": size, "up": size},
                                         bias=config.mlp_bias, quant_config=quant_config,
                                         prefix=f"{prefix}.gate_up_proj")
        self.down_proj = Linear(size, config.hidden_size, bias=config.mlp_bias,
                                quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, rotary, quant_config)
        self.mlp = MLP(config, layer_idx, quant_config)
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
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rotary, quant_config) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, meta)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint projection name -> (fused parameter's module name, shard)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config: ModelConfig, max_positions: int,
                 quant_config: QuantizationConfig | None = None,
                 lm_head_quant_config: QuantizationConfig | None = None) -> None:
        """quant_config: the format of the decoder layers' linear weights (None: the model's
        dtype); lm_head_quant_config: the LM head's (None: the model's dtype). The
        embedding stays in the model's dtype: a tied head in another format is a second
        copy of it."""
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions, quant_config)
        if config.tie_word_embeddings and lm_head_quant_config is None:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False,
                                  quant_config=lm_head_quant_config, prefix="lm_head")
        # The plan of the embedding as a tied head (an untied head is a Linear with its
        # own); set by kvflow.kernels.tuning.
        self.lm_head_plan: LinearPlan | None = None

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """-> hidden states [num_tokens, hidden_size]; logits are computed only where needed."""
        return self.model(input_ids, meta)

    @property
    def tied_head_weight(self) -> torch.Tensor | None:
        """The embedding where it is the LM head's weight (or what a head in another format
        was made from), else None."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        plan = head.plan if head is not None else None
        # A tied head in another format runs the rows its small-batch kernel takes; larger
        # batches multiply the embedding it was made from, which costs less than
        # dequantizing the copy.
        if head is not None and not (self.config.tie_word_embeddings
                                     and isinstance(plan, QuantizedPlan)
                                     and hidden.shape[0] > plan.small_max_rows):
            return head(hidden)
        return apply_linear(hidden, self.model.embed_tokens.weight, None, self.lm_head_plan)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]
