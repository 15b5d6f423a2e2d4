"""A Hugging Face checkpoint written as a single-file GGUF with the `gguf` package's
writer, as llama.cpp's converter and `llama-quantize` lay it out (metadata keys, tensor
names, Llama's q/k row order, a byte-level BPE vocabulary), for tests and the accuracy
benchmark, so that neither needs llama.cpp or a download.

The gguf package quantizes F16, BF16, Q8_0, Q4_0 and Q5_0 but not the K-quants, so
`quantize_q4_k` and `quantize_q6_k` here write valid blocks with a plain round-to-nearest
search (llama.cpp's own quantizer searches scales harder; the block layout is the same).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

# recipe -> GGML type of the decoder's and embedding's matrices; norms and biases stay F32.
RECIPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M")
# Without a whole number of 256-column super-blocks per row, llama-quantize falls back.
_K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "BF16": 32}
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                 "lm_head": "output"}
# llama.cpp's name for the split a tokenizer applies before its merges, for kvflow's
# byte-level test tokenizers (GPT-2's split) as transformers reads them: with Qwen2's split
# for a Qwen2 checkpoint whatever tokenizer.json says, as tokenizer.json says otherwise.
_PRE_TOKENIZERS = {"llama": "gpt-2", "qwen2": "qwen2", "qwen3": "gpt-2"}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_UNUSED = 1, 3, 5


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape[:-1], -1)


def quantize_q4_k(weight: np.ndarray) -> np.ndarray:
    """[rows, cols] float32 (cols a multiple of 256) -> Q4_K bytes [rows, cols / 256 * 144]:
    per super-block fp16 d and dmin, 6-bit scale and min of each 32-weight sub-block
    (w = d * sc * q - dmin * m), then the nibbles, 64-column runs with column j in byte j's
    low nibble and 32 + j in its high one."""
    rows, cols = weight.shape
    sub = weight.reshape(rows, cols // 256, 8, 32).astype(np.float32)
    low = np.minimum(sub.min(axis=-1), 0)  # llama.cpp's mins are never positive
    step = (sub.max(axis=-1) - low) / 15
    d = (step.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    dmin = ((-low).max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(step / np.where(d > 0, d, 1)[..., None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(-low / np.where(dmin > 0, dmin, 1)[..., None]), 0, 63).astype(np.uint8)
    scale = d[..., None] * sc
    q = np.rint((sub + (dmin[..., None] * m)[..., None]) / np.where(scale > 0, scale, 1)[..., None])
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(rows, cols // 256, 4, 2, 32)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, cols // 256, 128)
    packed = np.concatenate([
        sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
        m[..., :4] | ((m[..., 4:] >> 4) << 6),
        (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
    ], axis=-1)
    blocks = np.concatenate([_f16_bytes(d[..., None]), _f16_bytes(dmin[..., None]),
                             packed, qs], axis=-1)
    return blocks.reshape(rows, -1)


def quantize_q6_k(weight: np.ndarray) -> np.ndarray:
    """[rows, cols] float32 (cols a multiple of 256) -> Q6_K bytes [rows, cols / 256 * 210]:
    per super-block 128 bytes of low nibbles, 64 of high bit pairs, an int8 scale per 16
    weights and an fp16 d (w = d * scale * (q - 32), q in [0, 63])."""
    rows, cols = weight.shape
    sub = weight.reshape(rows, cols // 256, 16, 16).astype(np.float32)
    step = np.abs(sub).max(axis=-1) / 31
    d = (step.max(axis=-1) / 127).astype(np.float16).astype(np.float32)
    scales = np.clip(np.rint(step / np.where(d > 0, d, 1)[..., None]), -128, 127)
    factor = d[..., None] * scales
    q = np.rint(sub / np.where(factor > 0, factor, 1)[..., None])
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(rows, cols // 256, 256)
    # Each half of 128 weights: low nibbles of weights j and 64 + j share byte j; the top
    # two bits of weights j, 32 + j, 64 + j, 96 + j share byte j of the half's 32 bytes.
    halves = q.reshape(rows, cols // 256, 2, 128)
    ql = (halves[..., :64] & 15) | ((halves[..., 64:] & 15) << 4)
    top = (halves >> 4).reshape(rows, cols // 256, 2, 4, 32)
    qh = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
    blocks = np.concatenate([ql.reshape(rows, cols // 256, 128), qh.reshape(rows, cols // 256, 64),
                             scales.astype(np.int8).view(np.uint8), _f16_bytes(d[..., None])],
                            axis=-1)
    return blocks.reshape(rows, -1)


def quantize(weight: np.ndarray, type_name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    if type_name == "Q4_K":
        return quantize_q4_k(weight)
    if type_name == "Q6_K":
        return quantize_q6_k(weight)
    return gguf_quantize(weight, GGMLQuantizationType[type_name])


def _more_bits(layer: int, num_layers: int) -> bool:
    """Layers where llama.cpp's Q4_K_M spends Q6_K on attn_v and ffn_down: the first and
    last eighth, and every third in between."""
    eighth = num_layers // 8
    return layer < eighth or layer >= num_layers - eighth or (layer - eighth) % 3 == 2


def _matrix_type(recipe: str, gguf_name: str, num_layers: int, cols: int) -> str:
    if recipe in ("F32", "F16", "BF16", "Q8_0"):
        return recipe
    if gguf_name == "output.weight":
        chosen = "Q6_K"
    elif recipe == "Q4_0":
        chosen = "Q4_0"
    else:
        parts = gguf_name.split(".")
        more = parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down") and _more_bits(
            int(parts[1]), num_layers)
        chosen = "Q6_K" if more else "Q4_K"
    return _K_FALLBACK[chosen] if chosen in _K_FALLBACK and cols % 256 else chosen


def _gguf_name(hf_name: str) -> str:
    module, _, kind = hf_name.rpartition(".")
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.{kind}"
    _, _, index, rest = module.split(".", 3)
    return f"blk.{index}.{_LAYER_NAMES[rest]}.{kind}"


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
    writer.add_tokenizer_pre(_PRE_TOKENIZERS[arch])
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


def export_gguf(checkpoint: Path, out: Path, recipe: str) -> Path:
    """Write `checkpoint` (config.json, *.safetensors, tokenizer.json) to `out` with the
    recipe's types."""
    from gguf import GGMLQuantizationType, GGUFWriter

    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: one of {RECIPES}")
    config = json.loads((checkpoint / "config.json").read_text())
    arch = _ARCHITECTURES[config["architectures"][0]]
    num_heads, num_layers = config["num_attention_heads"], config["num_hidden_layers"]
    num_kv_heads = config.get("num_key_value_heads") or num_heads
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer = GGUFWriter(str(out), arch)
    writer.add_type("model")
    writer.add_name(checkpoint.name)
    writer.add_file_type(_FILE_TYPES[recipe])
    writer.add_quantization_version(2)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_factors(rope, head_dim))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(writer, checkpoint, arch, config)
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if config.get("tie_word_embeddings") and key == "lm_head.weight":
                    continue
                name = _gguf_name(key)
                array = f.get_tensor(key).to(torch.float32).numpy()
                if arch == "llama" and ".attn_q." in name:
                    array = _permute_qk(array, num_heads)
                elif arch == "llama" and ".attn_k." in name:
                    array = _permute_qk(array, num_kv_heads)
                type_name = ("F32" if array.ndim == 1 else
                             _matrix_type(recipe, name, num_layers, array.shape[1]))
                qtype = GGMLQuantizationType[type_name]
                writer.add_tensor(name, quantize(array, type_name), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
