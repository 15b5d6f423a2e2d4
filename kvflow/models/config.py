"""A Hugging Face config.json as the few fields kvflow's model code needs.

`ModelConfig.from_pretrained` reads the checkpoint's config through transformers and hands
it to the reader of its architecture's family (kvflow/models/registry.py), which
normalises it once and refuses what the family file does not implement, so model files
never probe for optional keys. Both the older keys hub
checkpoints carry (`rope_theta`, `rope_scaling`, `torch_dtype`) and the newer ones
transformers 5 writes (`rope_parameters`, `dtype`) are read.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvflow.config import parse_dtype
from kvflow.quantization.gptq_awq import CheckpointQuantization, read_checkpoint_quantization

_SUPPORTED_ACTS = ("silu",)


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    scaling_type: str = "default"  # default | linear | llama3 | factors | longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # "factors": a divisor per inverse frequency (rotary_dim / 2), as a GGUF file's
    # rope_freqs tensor holds Llama 3.1's scaling, computed by llama.cpp's converter
    frequency_factors: tuple[float, ...] = ()
    # "longrope" (Phi-3): divisors for contexts up to original_max_position_embeddings and
    # past it, and the factor cos and sin are multiplied by
    short_factors: tuple[float, ...] = ()
    long_factors: tuple[float, ...] = ()
    attention_factor: float = 1.0  # LongRoPE's and YaRN's factor on cos and sin
    # "yarn" (gpt-oss): the rotations per trained context that bound the band blended
    # between interpolated and original frequencies, and whether its ends are rounded
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's factor on cos and sin for a context `factor` times the trained one."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def read_rope(params: dict[str, Any], hf: Any) -> RopeConfig:
    """One set of RoPE parameters (a config's rope_parameters or rope_scaling, or one layer
    type's entry of them) as a RopeConfig; ValueError naming what kvflow does not compute."""
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    original = int(params.get("original_max_position_embeddings")
                   or getattr(hf, "original_max_position_embeddings", None)
                   or hf.max_position_embeddings)
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type == "longrope":
        # As transformers computes it: the factor is the context's growth unless given.
        factor = params.get("factor") or hf.max_position_embeddings / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = (1.0 if factor <= 1.0 else
                                math.sqrt(1 + math.log(factor) / math.log(original)))
        return RopeConfig(theta=float(theta), scaling_type="longrope", factor=float(factor),
                          original_max_position_embeddings=original,
                          short_factors=tuple(float(f) for f in params["short_factor"]),
                          long_factors=tuple(float(f) for f in params["long_factor"]),
                          attention_factor=float(attention_factor))
    if rope_type == "yarn":
        # As transformers computes it: the factor is the context's growth unless given, and
        # the attention factor follows from it (and DeepSeek's mscales) unless given.
        factor = params.get("factor") or hf.max_position_embeddings / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            mscale, all_dims = params.get("mscale"), params.get("mscale_all_dim")
            attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dims)
                                if mscale and all_dims else yarn_mscale(factor))
        return RopeConfig(theta=float(theta), scaling_type="yarn", factor=float(factor),
                          original_max_position_embeddings=original,
                          attention_factor=float(attention_factor),
                          beta_fast=float(params.get("beta_fast") or 32.0),
                          beta_slow=float(params.get("beta_slow") or 1.0),
                          truncate=bool(params.get("truncate", True)))
    return RopeConfig(
        theta=float(theta),
        scaling_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
    )


def _rope_params(hf: Any) -> dict[str, Any]:
    return getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}


def read_layer_ropes(hf: Any, num_layers: int) -> tuple[RopeConfig, ...]:
    """Each layer's RoPE: one set for all, or (Gemma 3) one per layer type."""
    params = _rope_params(hf)
    if params and "rope_theta" not in params and isinstance(next(iter(params.values())), dict):
        layer_types = getattr(hf, "layer_types", None) or []
        if len(layer_types) != num_layers or not set(layer_types) <= set(params):
            raise ValueError("rope_parameters are given per layer type, but layer_types does "
                             f"not name one of {sorted(params)} for each of the "
                             f"{num_layers} layers")
        per_type = {name: read_rope(p, hf) for name, p in params.items()}
        return tuple(per_type[t] for t in layer_types)
    return (read_rope(params, hf),) * num_layers


def read_sliding_windows(hf: Any, num_layers: int,
                         every_layer: bool = False) -> tuple[int | None, ...]:
    """Each layer's window (None: full attention). every_layer: the window applies to all
    layers whatever layer_types says (Mistral)."""
    window = getattr(hf, "sliding_window", None)
    if not window:
        return (None,) * num_layers
    layer_types = getattr(hf, "layer_types", None)
    if every_layer or not layer_types:
        return (int(window),) * num_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def _read_eos_ids(path: Path, hf: Any) -> tuple[int, ...]:
    ids: list[int] = []
    gen_path = path / "generation_config.json"
    candidates: list[Any] = [getattr(hf, "eos_token_id", None)]
    if gen_path.exists():
        candidates.insert(0, json.loads(gen_path.read_text()).get("eos_token_id"))
    for value in candidates:
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return tuple(ids)


def require(hf: Any, name: str, allowed: tuple[Any, ...], default: Any = None) -> Any:
    """The config field's value, ValueError naming it unless it is one kvflow implements."""
    value = getattr(hf, name, default)
    if value not in allowed:
        raise ValueError(f"{hf.__class__.__name__} field {name}={value!r} is not implemented "
                         f"by kvflow; implemented: {', '.join(map(repr, allowed))}")
    return value


@dataclass(frozen=True)
class MoeConfig:
    """A mixture-of-experts model's expert layers (kvflow/layers/moe.py)."""

    num_experts: int
    top_k: int  # experts per token
    intermediate_size: int  # each expert's width
    norm_topk_prob: bool  # the chosen experts' weights rescaled to sum to 1
    # per layer: experts (True) or the dense MLP of ModelConfig.intermediate_size
    sparse_layers: tuple[bool, ...]
    # softmax | sigmoid: router logits -> scores, then top-k; topk_softmax: top-k of the
    # logits, then a softmax over those (gpt-oss)
    scoring: str = "softmax"
    shared_expert_size: int = 0  # Qwen2-MoE's expert every token takes, under a sigmoid gate
    router_bias: bool = False
    expert_bias: bool = False  # a bias on each expert's projections (gpt-oss)
    # gpt-oss's clamped SwiGLU in the experts (kvflow/layers/activation.py) with this limit
    # and alpha; None: the model's hidden_act
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702


@dataclass(frozen=True)
class ModelConfig:
    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig  # the first layer's; layer_ropes has each layer's
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    checkpoint_dtype: torch.dtype
    eos_token_ids: tuple[int, ...] = field(default=())
    quantization: CheckpointQuantization | None = None  # a GPTQ or AWQ checkpoint's format
    hidden_act: str = "silu"  # silu | gelu_tanh: the gated MLP's activation
    layer_ropes: tuple[RopeConfig, ...] = ()  # per layer; () means `rope` for every layer
    rotary_dim: int | None = None  # the leading dims of a head that RoPE turns (None: all)
    attention_scale: float | None = None  # scores' factor (None: head_dim ** -0.5)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # the same on the LM head's logits
    qk_norm_all_heads: bool = False  # q/k norms over all heads at once (OLMoE), not per head
    attention_sinks: bool = False  # a learned logit per head in every softmax (gpt-oss)
    moe: MoeConfig | None = None  # the expert layers of a mixture-of-experts model
    # A tensor-parallel rank's view (kvflow/distributed/tensor_parallel.py): the ranks that
    # hold each of its KV heads, where the model has fewer KV heads than ranks.
    kv_head_replicas: int = 1
    # A pipeline stage's view (kvflow/distributed/pipeline.py): the layers [first, end) it
    # holds (None: all). The first stage holds the embedding, the last the norm and head.
    layer_range: tuple[int, int] | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        from kvflow.models.gguf import GgufFile, is_gguf
        from kvflow.models.gguf.config import gguf_model_config
        from kvflow.models.hf_config import load_hf_config
        from kvflow.models.registry import family_for

        if is_gguf(path):
            return gguf_model_config(GgufFile(path))
        hf = load_hf_config(path)
        architectures = getattr(hf, "architectures", None) or []
        if not architectures:
            raise ValueError(f"{path}/config.json names no architecture")
        return family_for(architectures[0]).read_config(hf, Path(path))

    @classmethod
    def read_common(cls, hf: Any, path: Path, **fields: Any) -> "ModelConfig":
        """The fields every family reads alike, with the family's own (biases, norms,
        activation, RoPE, scale, caps, ...) given as keyword arguments."""
        num_heads = hf.num_attention_heads
        num_layers = hf.num_hidden_layers
        raw_dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "float32"
        layer_ropes = fields.pop("layer_ropes", None) or read_layer_ropes(hf, num_layers)
        common = dict(
            path=str(path),
            architecture=hf.architectures[0],
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
            rms_norm_eps=hf.rms_norm_eps,
            rope=layer_ropes[0],
            layer_ropes=layer_ropes,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False,
            sliding_windows=read_sliding_windows(hf, num_layers),
            checkpoint_dtype=parse_dtype(raw_dtype),
            eos_token_ids=_read_eos_ids(path, hf),
        )
        if "quantization" not in fields:  # a family that reads its own format sets it
            common["quantization"] = read_checkpoint_quantization(
                getattr(hf, "quantization_config", None))
        return cls(**{**common, **fields})

    def rope_of(self, layer: int) -> RopeConfig:
        return self.layer_ropes[layer] if self.layer_ropes else self.rope

    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5

    def default_dtype(self, device: torch.device) -> torch.dtype:
        """dtype="auto": the checkpoint's, except that a GPTQ or AWQ checkpoint's fp16 runs
        in bf16 on the CPU, where kvflow's kernels take bf16 and float32 but not fp16 (vLLM
        also runs fp16 models in bf16 on the CPU)."""
        if (device.type == "cpu" and self.quantization is not None
                and self.checkpoint_dtype == torch.float16):
            return torch.bfloat16
        return self.checkpoint_dtype

    @property
    def held_layers(self) -> range:
        """The layers this rank holds (and their KV): all, or a pipeline stage's."""
        return range(*self.layer_range) if self.layer_range else range(self.num_layers)

    @property
    def first_stage(self) -> bool:
        return self.held_layers.start == 0

    @property
    def last_stage(self) -> bool:
        return self.held_layers.stop == self.num_layers

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * len(self.held_layers) * self.num_kv_heads * self.head_dim * itemsize
