"""A Hugging Face checkpoint written as a single-file GGUF with the `gguf` package's
writer, as llama.cpp's converter (convert_hf_to_gguf.py) and `llama-quantize` lay it out,
for tests and the accuracy benchmark, so that neither needs llama.cpp or a download.

Per architecture, as the converter's model classes write it: the metadata keys (and the
ones it leaves out: Gemma 2's RoPE base, Gemma's query_pre_attn_scalar, which llama.cpp
derives), the tensor names (the gguf package's own name map, which the converter uses),
and the values it changes: Llama's q/k rows interleaved for llama.cpp's pairwise rotary
(Mixtral's too, written as llama), 1 added to every Gemma norm weight, Phi-3's LongRoPE
factors as tensors, each projection of a mixture of experts' experts stacked into one
[experts, rows, columns] tensor, and its routers kept F32; gpt-oss's experts split from
their input-major, interleaved gate_up stacks and its sinks named as weights. The vocabulary
is written as the converter writes a byte-level BPE tokenizer (kvflow's test tokenizers
are BPE; its Gemma 2 class would read a SentencePiece tokenizer.model instead, and its
Gemma 3 class trims token_embd to the tokenizer's size, which the test tokenizers fill).
Blocks are written by kvflow/bench/gguf_quants.py.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from kvflow.bench.gguf_quants import quantize

# recipe -> GGML type of the decoder's and embedding's matrices; norms and biases stay F32.
# MXFP4: the experts' stacks in MXFP4 and the rest F32, as the converter writes OpenAI's
# gpt-oss checkpoints (whose experts are MXFP4 already) with --outtype f32.
RECIPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "MXFP4")
# Without a whole number of 256-column super-blocks per row, llama-quantize falls back.
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "BF16": 32,
               "MXFP4": 38}
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                  "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
                  "Phi3ForCausalLM": "phi3", "MixtralForCausalLM": "llama",
                  "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe",
                  "OlmoeForCausalLM": "olmoe", "GptOssForCausalLM": "gpt-oss"}
# Tensors the converter keeps F32 and llama-quantize does not touch: the routers.
_F32_TENSORS = ("ffn_gate_inp", "ffn_gate_inp_shexp")
# One expert's projection in a checkpoint: (the expert layer's name, expert, projection)
_EXPERT_KEY = re.compile(r"(.+\.experts)\.(\d+)\.(\w+)\.weight")
# llama.cpp's name for the split a tokenizer applies before its merges, for kvflow's
# byte-level test tokenizers (GPT-2's split) as transformers reads them: with Qwen2's split
# for a Qwen2 checkpoint whatever tokenizer.json says, as tokenizer.json says otherwise.
_PRE_TOKENIZERS = {"qwen2": "qwen2"}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_UNUSED = 1, 3, 5


def _more_bits(layer: int, num_layers: int) -> bool:
    """Layers where llama.cpp's Q4_K_M spends Q6_K on attn_v and ffn_down: the first and
    last eighth, and every third in between (its use_more_bits, in integer division)."""
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


def _matrix_type(recipe: str, gguf_name: str, num_layers: int, cols: int, tied: bool,
                 num_experts: int) -> str:
    """llama-quantize's choice for a matrix (or stack of experts' matrices): the output
    (or, with none, the embedding it shares) in Q6_K, and some layers' attn_v, fused
    attn_qkv and ffn_down (ffn_down_exps included) in Q6_K (llama.cpp's rule for attn_qkv
    alone, Q5_K in Q4_K_M, comes after the one it shares with attn_v and is never
    reached: its llama-quantize writes Q4_K or Q6_K); in a model of 8
    experts, attn_k and attn_v in Q8_0 and Q4_K_M's attn_output in Q5_K. A type whose
    blocks do not fit the rows falls back as llama-quantize's does: a K-quant to a
    32-column type, and a 32-column type to F16."""
    if recipe in ("F32", "F16", "BF16"):
        return recipe
    parts = gguf_name.split(".")
    role = parts[2] if parts[0] == "blk" else ""
    if recipe == "MXFP4":
        return "MXFP4" if role.endswith("_exps") else "F32"
    if recipe == "Q8_0":
        chosen = "Q8_0"
    elif gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        chosen = "Q6_K"
    elif num_experts == 8 and role in ("attn_k", "attn_v", "attn_qkv"):
        chosen = "Q8_0"
    elif recipe in ("Q4_0", "Q4_1"):
        chosen = recipe
    elif num_experts == 8 and role == "attn_output":
        chosen = "Q5_K"
    else:
        more = (role in ("attn_v", "attn_qkv") or role.startswith("ffn_down")) and _more_bits(
            int(parts[1]), num_layers)
        chosen = "Q6_K" if more else "Q4_K"
    if chosen in _K_FALLBACK and cols % 256:
        chosen = _K_FALLBACK[chosen]
    return "F16" if cols % 32 else chosen


def _rope_parameters(config: dict) -> tuple[dict, dict]:
    """(the global layers' RoPE parameters, the local ones') from config.json's
    rope_parameters (per layer type for Gemma 3) or older rope_scaling / rope_theta."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention", {})
    theta = {"rope_theta": config["rope_theta"]} if config.get("rope_theta") else {}
    return {**theta, **params}, {}


def _llama3_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3.1's rotary scaling as llama.cpp's converter stores it: the number each
    inverse frequency is divided by (1 for short wavelengths, `factor` for long ones, a
    blend between)."""
    theta = float(rope["rope_theta"])
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * np.pi / inv_freq
    old_len = rope["original_max_position_embeddings"]
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    smooth = np.clip((old_len / wavelength - low) / (high - low), 0, 1)
    return (1 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def _permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores each Llama head's q/k rows with the two rotary halves interleaved
    (row i of the first half, then row i of the second), for its interleaved rotary."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _add_rope(writer: Any, rope: dict) -> None:
    from gguf import RopeScalingType

    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type") == "yarn":  # with the betas config.json gives
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))


def _llama_parameters(writer: Any, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """LlamaModel's, Qwen2Model's and Qwen3Model's keys: the common ones, the vocabulary
    size, the head and rotary sizes, and Llama 3.1's scaling as rope_freqs."""
    rope, _ = _rope_parameters(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    _common_parameters(writer, config)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    _add_rope(writer, rope)
    if rope.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = _llama3_factors(rope, head_dim)
    writer.add_vocab_size(config["vocab_size"])


def _moe_parameters(writer: Any, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Qwen2MoeModel's and Qwen3MoeModel's keys: TextModel's (the common ones, the RoPE,
    the head size where config.json gives one), an expert's width and the shared
    expert's. The expert counts are every architecture's (_expert_counts)."""
    rope, _ = _rope_parameters(config)
    _common_parameters(writer, config)
    _add_rope(writer, rope)
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if config.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _olmoe_parameters(writer: Any, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """OlmoeModel's keys: TextModel's, with the norms' epsilon 1e-5 whatever config.json
    says."""
    _moe_parameters(writer, {**config, "rms_norm_eps": 1e-5}, tensors)


def _expert_counts(writer: Any, config: dict) -> int:
    """The number of experts and of experts a token takes, which the converter writes
    for every architecture whose config.json has them; -> the number of experts (0:
    none)."""
    num_experts = config.get("num_local_experts") or config.get("num_experts") or 0
    if num_experts:
        writer.add_expert_count(num_experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
    return num_experts


def _gpt_oss_parameters(writer: Any, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """GptOssModel's keys: TextModel's (the common ones, the head size, the RoPE base and
    its YaRN scaling), the window and an expert's width."""
    rope, _ = _rope_parameters(config)
    _common_parameters(writer, config)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    _add_rope(writer, rope)
    writer.add_sliding_window(config["sliding_window"])
    writer.add_expert_feed_forward_length(config["intermediate_size"])


def _gpt_oss_tensors(tensors: Iterable[tuple[str, np.ndarray]]
                     ) -> Iterator[tuple[str, np.ndarray]]:
    """gpt-oss's tensors as the converter names and shapes them: each expert stack
    input-major in the checkpoint ([experts, hidden, 2 * width], gate and up alternating)
    turned output-major and split into gate's and up's, the biases likewise, and the
    sinks named as a weight."""
    for key, array in tensors:
        if key.endswith(".self_attn.sinks"):
            yield f"{key}.weight", array
        elif key.endswith(".experts.gate_up_proj"):
            rows = array.swapaxes(-1, -2)
            yield key.replace("gate_up_proj", "gate_proj.weight"), rows[:, 0::2]
            yield key.replace("gate_up_proj", "up_proj.weight"), rows[:, 1::2]
        elif key.endswith(".experts.gate_up_proj_bias"):
            yield key.replace("gate_up_proj_bias", "gate_proj.bias"), array[..., 0::2]
            yield key.replace("gate_up_proj_bias", "up_proj.bias"), array[..., 1::2]
        elif key.endswith(".experts.down_proj"):
            yield f"{key}.weight", array.swapaxes(-1, -2)
        elif key.endswith(".experts.down_proj_bias"):
            yield key.replace("down_proj_bias", "down_proj.bias"), array
        else:
            yield key, array


def _common_parameters(writer: Any, config: dict) -> None:
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])


def _gemma2_parameters(writer: Any, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Gemma2Model's keys: no RoPE base (llama.cpp's default, 10000, is Gemma 2's) and no
    query_pre_attn_scalar."""
    _common_parameters(writer, config)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])


def _gemma3_parameters(writer: Any, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Gemma3Model's keys: the global layers' RoPE (base, linear scaling) and the local
    layers' base; the window unless every layer is global."""
    from gguf import RopeScalingType

    full, sliding = _rope_parameters(config)
    _common_parameters(writer, config)
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    writer.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
    if "rope_theta" in sliding:
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if config.get("sliding_window_pattern") != 1:
        writer.add_sliding_window(config["sliding_window"])


def _phi3_parameters(writer: Any, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Phi3MiniModel's keys: the rotary's width from partial_rotary_factor, LongRoPE's
    trained context and attention factor (computed from the context's growth, whatever
    config.json says), its factors as tensors; a window of 0 for none."""
    rope, _ = _rope_parameters(config)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    max_positions = config["max_position_embeddings"]
    original = rope.get("original_max_position_embeddings",
                        config.get("original_max_position_embeddings", max_positions))
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    _common_parameters(writer, config)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_rope_dimension_count(int(factor * hidden) // heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_sliding_window(config.get("sliding_window") or 0)
    if rope.get("long_factor"):
        scale = max_positions / original
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        tensors["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        tensors["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)


_PARAMETERS: dict[str, Callable[[Any, dict, dict[str, np.ndarray]], None]] = {
    "llama": _llama_parameters, "qwen2": _llama_parameters, "qwen3": _llama_parameters,
    "gemma2": _gemma2_parameters, "gemma3": _gemma3_parameters, "phi3": _phi3_parameters,
    "qwen2moe": _moe_parameters, "qwen3moe": _moe_parameters, "olmoe": _olmoe_parameters,
    "gpt-oss": _gpt_oss_parameters}


def _converted(arch: str, config: dict, hf_name: str, array: np.ndarray) -> np.ndarray:
    """A checkpoint tensor's values as the converter writes them."""
    if arch == "llama" and ".self_attn.q_proj." in hf_name:
        return _permute_qk(array, config["num_attention_heads"])
    if arch == "llama" and ".self_attn.k_proj." in hf_name:
        return _permute_qk(array, config.get("num_key_value_heads")
                           or config["num_attention_heads"])
    if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
        return array + 1
    return array


def _add_tokenizer(writer, checkpoint: Path, arch: str, model_config: dict) -> None:  # noqa: ANN001
    vocab_size = model_config["vocab_size"]
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    vocab.update(special)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_TOKEN_UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = _TOKEN_CONTROL if token in special else _TOKEN_NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZERS.get(arch, "gpt-2"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if template is None and (checkpoint / "chat_template.jinja").exists():
        template = (checkpoint / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id)):
        token = config.get(key)
        if isinstance(token, dict):
            token = token["content"]
        if token in vocab:
            add(vocab[token])
        elif isinstance(model_config.get(f"{key}_id"), int):  # as llama.cpp, config.json's
            add(model_config[f"{key}_id"])


def _checkpoint_tensors(checkpoint: Path) -> Iterator[tuple[str, np.ndarray]]:
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key).to(torch.float32).numpy()


def _stacked_experts(tensors: Iterable[tuple[str, np.ndarray]],
                     num_experts: int) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors with each projection's experts stacked, in expert order, into one
    `...experts.<projection>.weight` [experts, rows, columns], yielded once the last of
    them is read, as the converter merges them."""
    pending: dict[str, dict[int, np.ndarray]] = {}
    for key, array in tensors:
        match = _EXPERT_KEY.fullmatch(key)
        if match is None:
            yield key, array
            continue
        stacked = f"{match[1]}.{match[3]}.weight"
        parts = pending.setdefault(stacked, {})
        parts[int(match[2])] = array
        if len(parts) == num_experts:
            yield stacked, np.stack([parts[e] for e in range(num_experts)])
            del pending[stacked]
    if pending:
        raise ValueError(f"experts missing from {sorted(pending)}: each has {num_experts}")


def export_gguf(checkpoint: Path, out: Path, recipe: str) -> Path:
    """Write `checkpoint` (config.json, *.safetensors, tokenizer.json) to `out` with the
    recipe's types."""
    import gguf

    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: one of {RECIPES}")
    config = json.loads((checkpoint / "config.json").read_text())
    arch = _ARCHITECTURES[config["architectures"][0]]
    num_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(
        {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch], num_layers)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type("model")
    writer.add_name(checkpoint.name)
    writer.add_file_type(_FILE_TYPES[recipe])
    writer.add_quantization_version(2)
    rope_tensors: dict[str, np.ndarray] = {}
    _PARAMETERS[arch](writer, config, rope_tensors)
    num_experts = _expert_counts(writer, config)
    _add_tokenizer(writer, checkpoint, arch, config)
    for name, array in rope_tensors.items():
        writer.add_tensor(name, array)
    # Gemma 2's converter drops lm_head (llama.cpp's gemma2 has none); a tied one is not saved.
    tied = config.get("tie_word_embeddings") or arch == "gemma2"
    tensors = _stacked_experts(_checkpoint_tensors(checkpoint), num_experts)
    if arch == "gpt-oss":
        tensors = _gpt_oss_tensors(tensors)
    for key, array in tensors:
        if tied and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{checkpoint}: tensor {key!r} has no GGUF name for {arch}")
        array = np.ascontiguousarray(_converted(arch, config, key, array))
        # The converter keeps vectors, biases (experts' too) and routers F32.
        type_name = ("F32" if array.ndim == 1 or not name.endswith(".weight")
                     or name.split(".")[-2] in _F32_TENSORS else
                     _matrix_type(recipe, name, num_layers, array.shape[-1], tied, num_experts))
        writer.add_tensor(name, quantize(array, type_name),
                          raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
