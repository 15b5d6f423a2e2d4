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

GGUF files (llama.cpp's qwen3moe, qwen2moe and olmoe, and Mixtral written as llama with
an expert count) stack each projection across experts (ffn_gate_exps, ...) and say less
than config.json; the readers below fill the rest as llama.cpp's loader does
(src/models/*.cpp): every layer has experts, the softmax router renormalizes its top-k in
Qwen3-MoE and Mixtral and not in Qwen2-MoE or OLMoE (no key says), an expert's width is
`expert_feed_forward_length` (Qwen; without it, the MLP's width over the experts used) or
the MLP's (OLMoE, Mixtral), and Qwen2-MoE's shared expert is as wide as
`expert_shared_feed_forward_length` (without it, the MLP).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from kvflow.models.config import ModelConfig, MoeConfig, read_sliding_windows, require
from kvflow.models.gguf.config import MAX_WIDTH, read_gguf_config
from kvflow.models.gguf.file import MAX_EXPERTS, GgufFile
from kvflow.models.gguf.layout import ATTENTION_TENSORS, GgufLayout, expert_tensors
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


def _read_gguf(file: GgufFile, norm_topk_prob: bool, own_expert_width: bool = False,
               shared_expert: bool = False, **fields: Any) -> ModelConfig:
    """own_expert_width: an expert's width has its own key (Qwen's); shared_expert: every
    layer has a shared expert (Qwen2-MoE's)."""
    config = read_gguf_config(file, **fields)
    num_experts = file.arch_int("expert_count", 1, MAX_EXPERTS)
    top_k = file.arch_int("expert_used_count", 1, num_experts,
                          reason=f", as the file has {num_experts} experts")
    mlp = config.intermediate_size
    width = (file.arch_int("expert_feed_forward_length", 1, MAX_WIDTH, max(1, mlp // top_k))
             if own_expert_width else mlp)
    shared = (file.arch_int("expert_shared_feed_forward_length", 1, MAX_WIDTH, mlp)
              if shared_expert else 0)
    return replace(config, moe=MoeConfig(
        num_experts=num_experts, top_k=top_k, intermediate_size=width,
        norm_topk_prob=norm_topk_prob, sparse_layers=(True,) * config.num_layers,
        shared_expert_size=shared))


def read_qwen3_moe_gguf(file: GgufFile) -> ModelConfig:
    return _read_gguf(file, norm_topk_prob=True, own_expert_width=True)


def read_qwen2_moe_gguf(file: GgufFile) -> ModelConfig:
    return _read_gguf(file, norm_topk_prob=False, own_expert_width=True, shared_expert=True)


def read_mixtral_gguf(file: GgufFile) -> ModelConfig:
    return _read_gguf(file, norm_topk_prob=True)


def read_olmoe_gguf(file: GgufFile) -> ModelConfig:
    return _read_gguf(file, norm_topk_prob=False, qk_norm_all_heads=True)


class MoeForCausalLM(LlamaForCausalLM):
    expert_projections: ClassVar[dict[str, str]] = {
        "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class MixtralForCausalLM(LlamaForCausalLM):
    feed_forward_name: ClassVar[str] = "block_sparse_moe"
    expert_projections: ClassVar[dict[str, str]] = {"w1": "gate", "w3": "up", "w2": "down"}


def _gguf_layout(architecture: str, read: Callable[[GgufFile], ModelConfig],
                 model_class: type[LlamaForCausalLM],
                 shared_expert: bool = False, **options: Any) -> GgufLayout:
    """Llama's attention and norms with experts in place of the MLP, in every layer."""
    experts = expert_tensors(model_class.feed_forward_name, model_class.expert_projections,
                             shared_expert)
    return GgufLayout(architecture, read, {**ATTENTION_TENSORS, **experts}, has_experts=True,
                      **options)


register(ModelFamily("Qwen3MoeForCausalLM", MoeForCausalLM, read_qwen3_moe,
                     _gguf_layout("qwen3moe", read_qwen3_moe_gguf, MoeForCausalLM)))
register(ModelFamily("Qwen2MoeForCausalLM", MoeForCausalLM, read_qwen2_moe,
                     _gguf_layout("qwen2moe", read_qwen2_moe_gguf, MoeForCausalLM,
                                  shared_expert=True)))
# llama.cpp's converter writes Mixtral as Llama, q/k rows interleaved as for Llama.
register(ModelFamily("MixtralForCausalLM", MixtralForCausalLM, read_mixtral,
                     _gguf_layout("llama", read_mixtral_gguf, MixtralForCausalLM,
                                  permuted_qk=True)))
register(ModelFamily("OlmoeForCausalLM", MoeForCausalLM, read_olmoe,
                     _gguf_layout("olmoe", read_olmoe_gguf, MoeForCausalLM)))
