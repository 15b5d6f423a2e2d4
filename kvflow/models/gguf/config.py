"""A GGUF file's metadata as kvflow's ModelConfig.

Read from llama.cpp's `{architecture}.*` keys directly rather than through transformers'
`AutoConfig.from_pretrained(..., gguf_file=...)`: transformers' mapping has no attention or
MLP biases, Qwen3's head_dim or a tied LM head, which the file says through the tensors it
holds.
"""
from __future__ import annotations

import numpy as np
import torch

from kvflow.models.config import ModelConfig, RopeConfig
from kvflow.models.gguf.file import GgufFile, GgufTensor

# Bounds an order of magnitude past any model of the families kvflow runs, so that a
# damaged value is refused before it sizes anything.
MAX_WIDTH = 1 << 18  # hidden, MLP and head sizes
MAX_VOCAB = 1 << 24
# Qwen2.5-1M's 1,010,000 positions fit; the rotary tables are built for this many (1 GiB
# at a head size of 128), before the KV pool's size lowers max_model_len.
MAX_CONTEXT_LENGTH = 1 << 20
# llama.cpp's rope.scaling.type values kvflow's rotary embedding computes.
_ROPE_SCALING = {"none": "default", "linear": "linear"}
# The dtype a file's float weights suggest for --dtype auto; quantized files run in bf16,
# the dtype kvflow's quantized CPU kernels take.
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _rope(file: GgufFile, head_dim: int) -> RopeConfig:
    theta = file.arch_float("rope.freq_base", 10000.0)
    scaling = str(file.arch("rope.scaling.type", "none"))
    if file.rope_freqs is not None:
        if scaling != "none" or file.rope_freqs.shape != (head_dim // 2,):
            raise ValueError(f"{file.path.name}: rope_freqs.weight has shape "
                             f"{list(file.rope_freqs.shape)} with RoPE scaling {scaling!r}; "
                             f"kvflow reads it as {head_dim // 2} factors, without other scaling")
        return RopeConfig(theta=theta, scaling_type="factors",
                          frequency_factors=tuple(file.rope_freqs.tolist()))
    if scaling not in _ROPE_SCALING:
        raise ValueError(f"{file.path.name}: RoPE scaling {scaling!r} is not supported; "
                         f"supported: {', '.join(_ROPE_SCALING)}")
    if _ROPE_SCALING[scaling] == "default":
        return RopeConfig(theta=theta)
    return RopeConfig(theta=theta, scaling_type="linear",
                      factor=file.arch_float("rope.scaling.factor"))


def _checkpoint_dtype(file: GgufFile) -> torch.dtype:
    """The dtype of most of the file's decoder weights where they are floats, else bf16."""
    sizes: dict[str, int] = {}
    for t in file.tensors.values():
        if len(t.shape) == 2:
            sizes[t.type_name] = sizes.get(t.type_name, 0) + t.shape[0] * t.shape[1]
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


def _expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the config's model loads, by Hugging Face name, with its shape."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    hidden, inner = c.hidden_size, c.intermediate_size
    layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
             "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
             "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
             "mlp.gate_proj.weight": (inner, hidden), "mlp.up_proj.weight": (inner, hidden),
             "mlp.down_proj.weight": (hidden, inner)}
    if c.qkv_bias:
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                      "self_attn.v_proj.bias": (kv,)})
    if c.o_bias:
        layer["self_attn.o_proj.bias"] = (hidden,)
    if c.mlp_bias:
        layer.update({"mlp.gate_proj.bias": (inner,), "mlp.up_proj.bias": (inner,),
                      "mlp.down_proj.bias": (hidden,)})
    if c.qk_norm:
        layer.update({"self_attn.q_norm.weight": (c.head_dim,),
                      "self_attn.k_norm.weight": (c.head_dim,)})
    shapes = {"model.embed_tokens.weight": (c.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, hidden)
    for i in range(c.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def _check_tensors(file: GgufFile, config: ModelConfig) -> None:
    """Refuse, naming the tensor, one that kvflow cannot load or that does not fit the
    model the metadata describes, and name the tensors the model needs and lacks."""
    expected = _expected_shapes(config)
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
    """The model the file's metadata describes, after checking that its tensors fit it."""
    config = _model_config(file)
    _check_tensors(file, config)
    return config


def _model_config(file: GgufFile) -> ModelConfig:
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
    window = (file.arch_int("attention.sliding_window", 1, MAX_CONTEXT_LENGTH)
              if file.arch("attention.sliding_window", None) is not None else None)
    head_dim = file.arch_int("attention.key_length", 1, MAX_WIDTH, max(1, hidden // num_heads))
    if head_dim % 2:
        raise ValueError(f"{file.path.name}: the attention head size {head_dim} is odd; "
                         "rotary embeddings need an even one")
    return ModelConfig(
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
        rope=_rope(file, head_dim),
        max_position_embeddings=file.arch_int("context_length", 1, MAX_CONTEXT_LENGTH),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_down.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        sliding_windows=(window,) * num_layers,
        checkpoint_dtype=_checkpoint_dtype(file),
        eos_token_ids=_eos_ids(file, vocab),
    )
