"""A GGUF file's metadata as kvflow's ModelConfig.

Read from llama.cpp's `{architecture}.*` keys directly rather than through transformers'
`AutoConfig.from_pretrained(..., gguf_file=...)`: transformers' mapping has no attention or
MLP biases, Qwen3's head_dim or a tied LM head, which the file says through the tensors it
holds. `read_gguf_config` reads what every family stores alike; a family's layout
(kvflow/models/gguf/layout.py) may read more on top of it, as llama.cpp's loader does per
architecture (Gemma's soft caps, window pattern and attention scale).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from kvflow.models.config import ModelConfig, RopeConfig, yarn_mscale
from kvflow.models.gguf.file import GgufFile, GgufTensor
from kvflow.models.gguf.layout import EXPERT_TENSORS, GgufLayout

# Bounds an order of magnitude past any model of the families kvflow runs, so that a
# damaged value is refused before it sizes anything.
MAX_WIDTH = 1 << 18  # hidden, MLP and head sizes
MAX_VOCAB = 1 << 24
# Qwen2.5-1M's 1,010,000 positions fit; the rotary tables are built for this many (1 GiB
# at a head size of 128), before the KV pool's size lowers max_model_len.
MAX_CONTEXT_LENGTH = 1 << 20
# llama.cpp's rope.scaling.type values kvflow's rotary embedding computes.
_ROPE_SCALING = {"none": "default", "linear": "linear", "yarn": "yarn"}
# The dtype a file's float weights suggest for --dtype auto; quantized files run in bf16,
# the dtype kvflow's quantized CPU kernels take.
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _rope(file: GgufFile, rotary_dim: int, context_length: int) -> RopeConfig:
    theta = file.arch_float("rope.freq_base", 10000.0)
    scaling = str(file.arch("rope.scaling.type", "none"))
    factors = file.rope_tensors
    for name, array in factors.items():
        if array.shape != (rotary_dim // 2,):
            raise ValueError(f"{file.path.name}: {name}.weight holds {array.shape[0]} values; "
                             f"a rotary of {rotary_dim} dims takes {rotary_dim // 2}")
    if "rope_freqs" in factors:
        if scaling != "none" or len(factors) > 1:
            raise ValueError(f"{file.path.name}: rope_freqs.weight beside RoPE scaling "
                             f"{scaling!r} or other RoPE factors; kvflow reads it alone")
        return RopeConfig(theta=theta, scaling_type="factors",
                          frequency_factors=tuple(factors["rope_freqs"].tolist()))
    if factors:  # LongRoPE (Phi-3): llama.cpp's converter writes no scaling type for it
        if len(factors) != 2 or scaling not in ("none", "longrope"):
            raise ValueError(f"{file.path.name}: LongRoPE needs both rope_factors_short and "
                             f"rope_factors_long and no other scaling; the file has "
                             f"{sorted(factors)} with RoPE scaling {scaling!r}")
        original = file.arch_int("rope.scaling.original_context_length", 1, context_length,
                                 context_length)
        # llama.cpp scales cos and sin by attn_factor, 1 where the key is absent.
        return RopeConfig(theta=theta, scaling_type="longrope",
                          factor=context_length / original,
                          original_max_position_embeddings=original,
                          short_factors=tuple(factors["rope_factors_short"].tolist()),
                          long_factors=tuple(factors["rope_factors_long"].tolist()),
                          attention_factor=file.arch_float("rope.scaling.attn_factor", 1.0))
    if scaling not in _ROPE_SCALING:
        raise ValueError(f"{file.path.name}: RoPE scaling {scaling!r} is not supported; "
                         f"supported: {', '.join(_ROPE_SCALING)}")
    if _ROPE_SCALING[scaling] == "default":
        return RopeConfig(theta=theta)
    factor = file.arch_float("rope.scaling.factor")
    if scaling == "yarn":
        # As llama.cpp's YaRN: the betas default to 32 and 1, the band's ends are rounded
        # outwards, and cos and sin are scaled by attn_factor times YaRN's own factor.
        original = file.arch_int("rope.scaling.original_context_length", 1, context_length)
        return RopeConfig(theta=theta, scaling_type="yarn", factor=factor,
                          original_max_position_embeddings=original,
                          attention_factor=(file.arch_float("rope.scaling.attn_factor", 1.0)
                                            * yarn_mscale(factor)),
                          beta_fast=file.arch_float("rope.scaling.yarn_beta_fast", 32.0),
                          beta_slow=file.arch_float("rope.scaling.yarn_beta_slow", 1.0))
    return RopeConfig(theta=theta, scaling_type="linear", factor=factor)


def _checkpoint_dtype(file: GgufFile) -> torch.dtype:
    """The dtype of most of the file's weights (matrices, and experts' stacks of them)
    where they are floats, else bf16."""
    sizes: dict[str, int] = {}
    for t in file.tensors.values():
        if len(t.shape) >= 2:
            sizes[t.type_name] = sizes.get(t.type_name, 0) + math.prod(t.shape)
    return _FLOAT_DTYPES.get(max(sizes, key=sizes.__getitem__, default=""), torch.bfloat16)


def _eos_ids(file: GgufFile, vocab_size: int) -> tuple[int, ...]:
    """The ids that end a sequence, after checking every special token id the tokenizer
    metadata names (bos, eos, padding, ...) against the vocabulary."""
    ids = {}
    for name in file.keys():
        if name.startswith("tokenizer.ggml.") and name.endswith("_token_id"):
            ids[name] = file.check_int(name, file.get(name), 0, vocab_size - 1,
                                       f", the ids of its {vocab_size:,}-token vocabulary")
    return tuple(dict.fromkeys(ids[f"tokenizer.ggml.{key}"] for key in
                               ("eos_token_id", "eot_token_id", "eom_token_id")
                               if f"tokenizer.ggml.{key}" in ids))


def _check_dequantizable(t: GgufTensor) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[t.type_name]
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except NotImplementedError:
        raise ValueError(f"GGUF tensor {t.name!r} is {t.type_name}, a type kvflow cannot load "
                         "(the gguf package has no dequantizer for it)") from None


def _module_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The weight shape of every decoder-layer module a GGUF tensor may fill, by its
    Hugging Face name (Phi-3's qkv_proj and gate_up_proj are stored fused)."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    hidden, inner = c.hidden_size, c.intermediate_size
    q_norm, k_norm = (q, kv) if c.qk_norm_all_heads else (c.head_dim, c.head_dim)
    return {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
            "pre_feedforward_layernorm": (hidden,), "post_feedforward_layernorm": (hidden,),
            "self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden), "self_attn.qkv_proj": (q + 2 * kv, hidden),
            "self_attn.o_proj": (hidden, q),
            "self_attn.q_norm": (q_norm,), "self_attn.k_norm": (k_norm,),
            "self_attn.sinks": (c.num_heads,),
            "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden),
            "mlp.gate_up_proj": (2 * inner, hidden), "mlp.down_proj": (hidden, inner)}


def _expert_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each expert-layer tensor, by llama.cpp's name (which every family
    shares, where the modules they load into differ: Qwen's mlp.experts.gate_proj,
    Mixtral's block_sparse_moe.experts.w1); empty for a model without experts. The shared
    expert's are read only from a layout that has one (Qwen2-MoE's)."""
    if c.moe is None:
        return {}
    experts, hidden, inner = c.moe.num_experts, c.hidden_size, c.moe.intermediate_size
    shared = c.moe.shared_expert_size
    return {"ffn_gate_inp": (experts, hidden), "ffn_gate_exps": (experts, inner, hidden),
            "ffn_up_exps": (experts, inner, hidden), "ffn_down_exps": (experts, hidden, inner),
            "ffn_gate_inp_shexp": (1, hidden), "ffn_gate_shexp": (shared, hidden),
            "ffn_up_shexp": (shared, hidden), "ffn_down_shexp": (hidden, shared)}


_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_EXPERT_PROJECTIONS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _expected_shapes(c: ModelConfig, layout: GgufLayout) -> dict[str, tuple[int, ...]]:
    """Every tensor the config's model loads from a file of this layout, by Hugging Face
    name, with its shape. A layout with experts has them in every layer, as llama.cpp's
    MoE architectures do (their files name no dense MLP)."""
    shapes, expert_shapes = _module_shapes(c), _expert_shapes(c)
    layer: dict[str, tuple[int, ...]] = {}
    for name, module in layout.layer_tensors.items():
        if (module in _QK_NORMS and not c.qk_norm
                or module == "self_attn.sinks" and not c.attention_sinks):
            continue
        shape = expert_shapes[name] if name in EXPERT_TENSORS else shapes[module]
        layer[f"{module}.weight"] = shape
    biased = ((_QKV if c.qkv_bias else ()) + (("self_attn.o_proj",) if c.o_bias else ())
              + (_MLP if c.mlp_bias else ()))
    layer.update({f"{m}.bias": shapes[m][:1] for m in layout.layer_tensors.values()
                  if m in biased})
    # gpt-oss's router and experts have biases: [experts] and [experts, rows]
    biased_experts = ((("ffn_gate_inp",) if c.moe is not None and c.moe.router_bias else ())
                      + (_EXPERT_PROJECTIONS if c.moe is not None and c.moe.expert_bias
                         else ()))
    layer.update({f"{layout.layer_tensors[n]}.bias": expert_shapes[n][:-1]
                  for n in biased_experts if n in layout.layer_tensors})
    expected = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
                "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        expected["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        expected.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return expected


def _check_tensors(file: GgufFile, config: ModelConfig) -> None:
    """Refuse, naming the tensor, one that kvflow cannot load or that does not fit the
    model the metadata describes, and name the tensors the model needs and lacks."""
    expected = _expected_shapes(config, file.layout)
    checked_types = {"F32", "F16", "BF16"}
    for t in file.tensors.values():
        if t.type_name not in checked_types:
            _check_dequantizable(t)
            checked_types.add(t.type_name)
        if t.hf_name not in expected:
            raise ValueError(f"{file.path.name}: tensor {t.name!r} does not belong to the "
                             f"{config.num_layers}-layer model its metadata describes")
        if t.shape != expected[t.hf_name]:
            raise ValueError(f"{file.path.name}: tensor {t.name!r} has shape {list(t.shape)}, "
                             f"the metadata implies {list(expected[t.hf_name])}")
    missing = sorted(set(expected) - {t.hf_name for t in file.tensors.values()})
    if missing:
        raise ValueError(f"{file.path.name} lacks {len(missing)} tensors the model needs, "
                         f"e.g. {missing[:3]}")


def gguf_model_config(file: GgufFile) -> ModelConfig:
    """The model the file's metadata describes, read by its family's layout, after checking
    that its tensors fit it."""
    config = file.layout.read_config(file)
    _check_tensors(file, config)
    return config


def _first_layer_has(file: GgufFile, *names: str) -> bool:
    held = {t.hf_name for t in file.tensors.values()}
    return any(f"model.layers.0.{name}" in held for name in names)


def read_gguf_config(file: GgufFile, **fields: Any) -> ModelConfig:
    """The fields every family reads alike from llama.cpp's keys and from the tensors the
    file holds (biases, q/k norms, an untied LM head, RoPE factors), with the family's own
    given as keyword arguments, as ModelConfig.read_common does for config.json."""
    tensors = file.tensors
    hidden = file.arch_int("embedding_length", 1, MAX_WIDTH)
    num_heads = file.arch_int("attention.head_count", 1, hidden)
    num_kv_heads = file.arch_int("attention.head_count_kv", 1, num_heads, num_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"{file.path.name}: {num_heads} attention heads cannot share "
                         f"{num_kv_heads} KV heads evenly")
    # Each layer has tensors of its own: more layers than tensors cannot load.
    num_layers = file.arch_int("block_count", 1, max(1, len(tensors)),
                               reason=f", as the file holds {len(tensors)} tensors")
    embedding = tensors.get("token_embd.weight")
    vocab = file.arch_int("vocab_size", 1, MAX_VOCAB,
                          embedding.shape[0] if embedding is not None else None)
    # 0 (Phi-3's converter writes it for a config without one): no window.
    window = file.arch_int("attention.sliding_window", 0, MAX_CONTEXT_LENGTH, 0) or None
    head_dim = file.arch_int("attention.key_length", 1, MAX_WIDTH, max(1, hidden // num_heads))
    file.arch_int("attention.value_length", head_dim, head_dim, head_dim,
                  reason=", the key length: kvflow's heads have one size")
    # llama.cpp's n_rot: the leading dims of each head that RoPE turns (partial rotary).
    rotary_dim = file.arch_int("rope.dimension_count", 2, head_dim, head_dim)
    if rotary_dim % 2:
        raise ValueError(f"{file.path.name}: RoPE turns {rotary_dim} dims of each head; "
                         "rotary embeddings need an even number")
    context_length = file.arch_int("context_length", 1, MAX_CONTEXT_LENGTH)
    common = dict(
        path=str(file.path),
        architecture=file.architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=file.arch_int("feed_forward_length", 1, MAX_WIDTH),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=file.arch_float("attention.layer_norm_rms_epsilon"),
        rope=_rope(file, rotary_dim, context_length),
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        max_position_embeddings=context_length,
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias=_first_layer_has(file, "self_attn.q_proj.bias", "self_attn.qkv_proj.bias"),
        o_bias=_first_layer_has(file, "self_attn.o_proj.bias"),
        mlp_bias=_first_layer_has(file, "mlp.down_proj.bias"),
        qk_norm=_first_layer_has(file, "self_attn.q_norm.weight"),
        sliding_windows=(window,) * num_layers,
        checkpoint_dtype=_checkpoint_dtype(file),
        eos_token_ids=_eos_ids(file, vocab),
    )
    return ModelConfig(**{**common, **fields})
