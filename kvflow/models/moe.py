"""The mixture-of-experts families: Qwen3-MoE, Qwen2-MoE, Mixtral and OLMoE, Llama's
decoder with experts (kvflow/layers/moe.py) in place of the MLP.

What sets them apart is read into the config: which layers have experts (Qwen's
`mlp_only_layers` and `decoder_sparse_step`; every layer elsewhere), whether the router
rescales the chosen experts' weights to sum to 1 (`norm_topk_prob`; always in Mixtral),
Qwen2-MoE's shared expert and its sigmoid gate, the attention of the dense family each
comes from (Qwen3's per-head q/k norms, Qwen2's q/k/v biases, Mistral's window) and
OLMoE's q/k norms over all heads at once. Mixtral's checkpoints name the experts
`block_sparse_moe.experts.N.w1/w2/w3`, the others `mlp.experts.N.gate_proj/up_proj/
down_proj`; each is loaded into one stacked tensor per projection.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from kvflow.models.config import ModelConfig, MoeConfig, read_sliding_windows, require
from kvflow.models.llama import LlamaForCausalLM
from kvflow.models.registry import ModelFamily, register


def _sparse_layers(hf: Any) -> tuple[bool, ...]:
    """Qwen's rule: a layer has experts unless mlp_only_layers names it, every
    decoder_sparse_step-th layer (1: all). Families without the fields have experts in every
    layer."""
    only_dense = set(getattr(hf, "mlp_only_layers", None) or ())
    step = getattr(hf, "decoder_sparse_step", None) or 1
    return tuple(i not in only_dense and hf.num_experts > 0 and (i + 1) % step == 0
                 for i in range(hf.num_hidden_layers))


def _read(hf: Any, path: Path, expert_size: int, norm_topk_prob: bool,
          shared_expert_size: int = 0, **fields: Any) -> ModelConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    moe = MoeConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                    intermediate_size=expert_size, norm_topk_prob=norm_topk_prob,
                    sparse_layers=_sparse_layers(hf), shared_expert_size=shared_expert_size)
    return ModelConfig.read_common(hf, path, moe=moe, **fields)


def read_qwen3_moe(hf: Any, path: Path) -> ModelConfig:
    bias = bool(getattr(hf, "attention_bias", False))
    # Qwen3-MoE's window, when use_sliding_window sets one, is on every layer.
    return _read(hf, path, hf.moe_intermediate_size, bool(hf.norm_topk_prob), qkv_bias=bias,
                 o_bias=bias, qk_norm=True,
                 sliding_windows=read_sliding_windows(hf, hf.num_hidden_layers,
                                                      every_layer=True))


def read_qwen2_moe(hf: Any, path: Path) -> ModelConfig:
    return _read(hf, path, hf.moe_intermediate_size, bool(hf.norm_topk_prob),
                 shared_expert_size=hf.shared_expert_intermediate_size,
                 qkv_bias=bool(getattr(hf, "qkv_bias", True)))


def read_mixtral(hf: Any, path: Path) -> ModelConfig:
    return _read(hf, path, hf.intermediate_size, True,
                 sliding_windows=read_sliding_windows(hf, hf.num_hidden_layers,
                                                      every_layer=True))


def read_olmoe(hf: Any, path: Path) -> ModelConfig:
    require(hf, "clip_qkv", (None,))
    bias = bool(getattr(hf, "attention_bias", False))
    return _read(hf, path, hf.intermediate_size, bool(hf.norm_topk_prob), qkv_bias=bias,
                 o_bias=bias, qk_norm=True, qk_norm_all_heads=True)


class MoeForCausalLM(LlamaForCausalLM):
    expert_projections: ClassVar[dict[str, str]] = {
        "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class MixtralForCausalLM(LlamaForCausalLM):
    feed_forward_name: ClassVar[str] = "block_sparse_moe"
    expert_projections: ClassVar[dict[str, str]] = {"w1": "gate", "w3": "up", "w2": "down"}


register(ModelFamily("Qwen3MoeForCausalLM", MoeForCausalLM, read_qwen3_moe))
register(ModelFamily("Qwen2MoeForCausalLM", MoeForCausalLM, read_qwen2_moe))
register(ModelFamily("MixtralForCausalLM", MixtralForCausalLM, read_mixtral))
register(ModelFamily("OlmoeForCausalLM", MoeForCausalLM, read_olmoe))
