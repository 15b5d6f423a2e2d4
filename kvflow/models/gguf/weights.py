"""A GGUF file's tensors as kvflow parameters: which linear layers run which kvflow method,
and each tensor unpacked for it.

Per linear layer (all of a fused layer's shards together), and per expert layer (its
stacked gate, up and down projections together):
- Q4_0, Q4_1 and Q4_K become int4 with a group of 32 (a Q4_K sub-block, or a Q4_0 or Q4_1
  block): each is w = q * scale + offset per 32 weights with q in [0, 15], unpacked and packed again
  in kvflow's int4 layout (a layer whose rows, or each expert's, do not make whole blocks
  of 16, or whose columns whole blocks of 64, is dequantized instead). Exact where the
  model runs in float32; in bf16 or fp16 each group's scale and offset are rounded to
  that dtype.
- Q8_0 becomes int8, which keeps one scale per output row where Q8_0 keeps one per 32
  weights: each weight is dequantized and rounded again to its row's grid (the log says
  how far that moved the weights).
- Everything else (F32, F16, BF16, Q6_K, Q5_K, Q5_0, ... and a layer whose shards differ,
  as an expert layer of Q4_K_M whose ffn_down_exps is Q6_K) is dequantized at load, by the
  gguf package, to the model's dtype, with a warning for quantized experts, most of an MoE
  file's bytes. So are the embedding, the LM head, the norms and the routers of
  mixture-of-experts layers.
Experts (llama.cpp's stacked ffn_*_exps, [experts, rows, columns]) take the same unpacking
as a matrix of experts * rows rows: both formats go row by row, and int4's blocks of 16 rows
never straddle two experts, so each expert's rows come out as its own matrix's would.
A type the gguf package cannot dequantize is refused with the model's config
(gguf/config.py), before anything is built. Each tensor leaves here as the Hugging Face
checkpoint held it (but experts, which stay stacked per projection): what llama.cpp's
converter changed (Llama's q/k row order, Gemma's 1 + w norms) is undone, so every
parameter's weight_loader sees the checkpoint's values.
"""
from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from kvflow.layers.moe import ExpertMethod, UnquantizedExpertMethod
from kvflow.models.config import ModelConfig
from kvflow.models.gguf.file import GgufFile, GgufTensor
from kvflow.models.gguf.layout import ROUTER_TENSORS
from kvflow.quantization.base import LinearMethod, PrequantizedWeight, QuantizationConfig
from kvflow.quantization.experts import Int4ExpertMethod, Int8ExpertMethod
from kvflow.quantization.int4 import PACK_BLOCK, ROW_BLOCK, Int4LinearMethod, pack_int4
from kvflow.quantization.int4 import layout as int4_layout
from kvflow.quantization.int8 import LAYOUT as INT8_LAYOUT
from kvflow.quantization.int8 import Int8LinearMethod, quantize_int8
from kvflow.quantization.unquantized import UnquantizedLinearMethod

logger = logging.getLogger(__name__)

INT4_GROUP = 32
_NATIVE = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q8_0": "int8"}
_FLOATS = ("F32", "F16", "BF16")
_GGUF_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _layer_prefix(hf_name: str, packed_modules: dict[str, tuple[str, str]]) -> str:
    """The name of the kvflow layer a checkpoint tensor loads into (q_proj's is qkv_proj's;
    an expert's, stacked or not, is its expert layer's)."""
    experts, found, _ = hf_name.partition(".experts.")
    if found:
        return f"{experts}.experts"
    module = hf_name.rsplit(".", 1)[0]
    parent, _, leaf = module.rpartition(".")
    fused = packed_modules.get(leaf)
    return f"{parent}.{fused[0]}" if fused else module


@dataclass(frozen=True)
class GgufQuantConfig(QuantizationConfig):
    """The method of each linear and expert layer of a GGUF model: "int4", "int8", or
    absent (the model's dtype)."""

    name: ClassVar[str] = "gguf"
    methods: dict[str, str] = field(default_factory=dict)
    # the model class's map of checkpoint projections onto its fused layers
    packed_modules: dict[str, tuple[str, str]] = field(default_factory=dict)

    def method_of(self, hf_name: str) -> str | None:
        """The method of the linear or expert layer a checkpoint tensor loads into."""
        return self.methods.get(_layer_prefix(hf_name, self.packed_modules))

    def linear_method(self, prefix: str) -> LinearMethod:
        method = self.methods.get(prefix)
        if method == "int4":
            return Int4LinearMethod(INT4_GROUP)
        if method == "int8":
            return Int8LinearMethod()
        return UnquantizedLinearMethod()

    def expert_method(self, prefix: str) -> ExpertMethod:
        method = self.methods.get(prefix)
        if method == "int4":
            return Int4ExpertMethod(INT4_GROUP)
        if method == "int8":
            return Int8ExpertMethod()
        return UnquantizedExpertMethod()


def _shard_rows(t: GgufTensor, config: ModelConfig) -> tuple[int, ...]:
    """The rows of each part of kvflow's fused layer a tensor fills: one part, or all of
    them for a tensor stored fused (Phi-3's qkv_proj and gate_up_proj); an expert stack's
    are each expert's."""
    if ".self_attn.qkv_proj." in t.hf_name:
        kv = config.num_kv_heads * config.head_dim
        return config.num_heads * config.head_dim, kv, kv
    if ".mlp.gate_up_proj." in t.hf_name:
        return config.intermediate_size, config.intermediate_size
    return t.shape[-2:-1]


def plan_gguf(file: GgufFile, config: ModelConfig, dtype: torch.dtype,
              packed_modules: dict[str, tuple[str, str]]) -> GgufQuantConfig:
    """Choose each linear and expert layer's method from its tensors' types (checked by
    gguf_model_config), and log what each type becomes."""
    layer_types: dict[str, set[str]] = defaultdict(set)
    blocks_fit: dict[str, bool] = defaultdict(lambda: True)
    for t in file.tensors.values():
        if _is_decoder_weight(t) or _is_expert_weight(t):
            prefix = _layer_prefix(t.hf_name, packed_modules)
            layer_types[prefix].add(t.type_name)
            # int4 packs each part of a layer in blocks of ROW_BLOCK rows by PACK_BLOCK
            # columns; a Q4 tensor need only have rows of whole 32-column blocks.
            blocks_fit[prefix] &= t.shape[-1] % PACK_BLOCK == 0 and all(
                rows % ROW_BLOCK == 0 for rows in _shard_rows(t, config))
    methods = {}
    for prefix, types in layer_types.items():
        targets = {_NATIVE.get(name) for name in types}
        method = targets.pop() if len(targets) == 1 else None
        if method is not None and (method != "int4" or blocks_fit[prefix]):
            methods[prefix] = method
    config = GgufQuantConfig(methods, packed_modules)
    became = Counter((t.type_name, _target(config, t, dtype)) for t in file.tensors.values())
    for (type_name, target), count in sorted(became.items()):
        logger.info("GGUF %s: %d tensor(s) -> %s", type_name, count, target)
    _warn_dequantized_experts(file, config, dtype)
    return config


def _warn_dequantized_experts(file: GgufFile, config: GgufQuantConfig,
                              dtype: torch.dtype) -> None:
    """Quantized experts left to the model's dtype, most of an MoE file's bytes, take their
    float size in memory."""
    quantized = [t for t in file.tensors.values() if _is_expert_weight(t)
                 and t.type_name not in _FLOATS and _method(config, t) is None]
    if quantized:
        types = ", ".join(sorted({t.type_name for t in quantized}))
        stored = sum(t.data.nbytes for t in quantized)
        loaded = sum(math.prod(t.shape) for t in quantized) * dtype.itemsize
        logger.warning("GGUF %s experts (%d tensors, %.2f GiB) are dequantized to %s at load "
                       "(%.2f GiB): kvflow's expert layers take Q8_0 or Q4_0/Q4_1/Q4_K "
                       "only where a layer's projections share the type (and fit int4's "
                       "blocks)",
                       types, len(quantized), stored / 2**30,
                       str(dtype).removeprefix("torch."), loaded / 2**30)


def _is_decoder_weight(t: GgufTensor) -> bool:
    """A decoder layer's matrix, which its layer may take in a quantized format (a router,
    never quantized, is not one)."""
    return (t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2
            and t.name.split(".")[2] not in ROUTER_TENSORS)


def _is_expert_weight(t: GgufTensor) -> bool:
    return t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 3


def _method(config: GgufQuantConfig, t: GgufTensor) -> str | None:
    return (config.method_of(t.hf_name) if _is_decoder_weight(t) or _is_expert_weight(t)
            else None)


def _target(config: GgufQuantConfig, t: GgufTensor, dtype: torch.dtype) -> str:
    method = _method(config, t)
    dtype_name = str(dtype).removeprefix("torch.")
    experts = " experts" if _is_expert_weight(t) else ""
    if method == "int4":
        exact = ("exact" if dtype == torch.float32
                 else f"exact but for scales and offsets rounded to {dtype_name}")
        return f"int4 g{INT4_GROUP}{experts} ({exact})"
    if method == "int8":
        return f"int8{experts} per output channel (dequantized and requantized)"
    if _GGUF_NAMES.get(dtype) == t.type_name:
        return dtype_name
    if t.type_name in _FLOATS:
        return f"{dtype_name} (converted)"
    if _is_expert_weight(t):
        return f"{dtype_name} (experts, dequantized at load)"
    return f"{dtype_name} (dequantized at load)"


def _qk_row_order(num_heads: int, rows: int) -> torch.Tensor:
    """Rows of a checkpoint q/k weight in the order llama.cpp's converter stored them:
    within each head it interleaves the two rotary halves (row i of the first half, row i
    of the second, ...), which kvflow's rotate-half rotary reads split apart again."""
    half = rows // num_heads // 2
    return torch.arange(rows).view(num_heads, half, 2).transpose(1, 2).reshape(-1)


def _f16_scales(block_bytes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(block_bytes).view(np.float16)[..., 0]).float()


def _block_nibbles(qs: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """A Q4_0/Q4_1 block's 16 bytes (element j in the low nibble of byte j, element 16 + j
    in its high one) -> q uint8 [rows, cols]."""
    qs = torch.from_numpy(np.ascontiguousarray(qs))
    return torch.cat([qs & 15, qs >> 4], dim=-1).view(rows, cols)


def unpack_q4_0(data: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """Q4_0 blocks (an fp16 scale d, then 16 bytes of nibbles; w = d * (q - 8)) -> (q uint8
    [rows, cols], scale, offset), int4 g32 before packing."""
    blocks = data.reshape(rows, cols // 32, 18)
    d = _f16_scales(blocks[..., :2])
    return _block_nibbles(blocks[..., 2:], rows, cols), d, -8 * d


def unpack_q4_1(data: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """Q4_1 blocks (fp16 scale d and minimum m, then 16 bytes of nibbles; w = d * q + m)
    -> (q uint8 [rows, cols], scale, offset), int4 g32 before packing."""
    blocks = data.reshape(rows, cols // 32, 20)
    return (_block_nibbles(blocks[..., 4:], rows, cols), _f16_scales(blocks[..., :2]),
            _f16_scales(blocks[..., 2:4]))


def unpack_q4_k(data: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """Q4_K super-blocks of 256 (fp16 d and dmin, twelve bytes of 6-bit scales and mins for
    eight sub-blocks of 32, then 128 bytes of nibbles, each 64-column run's byte j holding
    column j low and 32 + j high; w = d * sc * q - dmin * m) -> (q uint8 [rows, cols],
    scale, offset), int4 g32 before packing."""
    blocks = data.reshape(rows, cols // 256, 144)
    d, dmin = _f16_scales(blocks[..., 0:2]), _f16_scales(blocks[..., 2:4])
    packed = torch.from_numpy(np.ascontiguousarray(blocks[..., 4:16])).view(rows, -1, 3, 4)
    low, high, rest = packed[:, :, 0].int(), packed[:, :, 1].int(), packed[:, :, 2].int()
    # Sub-blocks 0-3 keep six bits in the first two rows of four bytes; 4-7 take four bits
    # from the third row and their top two from the first two rows' spare bits.
    sc = torch.cat([low & 63, (rest & 15) | ((low >> 6) << 4)], dim=-1)
    m = torch.cat([high & 63, (rest >> 4) | ((high >> 6) << 4)], dim=-1)
    scale = (d[..., None] * sc.float()).view(rows, -1)
    offset = -(dmin[..., None] * m.float()).view(rows, -1)
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., 16:])).view(rows, cols // 64, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], dim=2).view(rows, cols)
    return q, scale, offset


_UNPACK = {"Q4_0": unpack_q4_0, "Q4_1": unpack_q4_1, "Q4_K": unpack_q4_k}


def dequantize(t: GgufTensor) -> torch.Tensor:
    """The tensor as floats: F32/F16 as stored, anything else by the gguf package's
    dequantizer (float32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    if t.type_name in ("F32", "F16"):
        array = np.asarray(t.data)
    else:
        array = gguf_dequantize(np.asarray(t.data), GGMLQuantizationType[t.type_name])
    # A copy: the memory-mapped file is read-only, and torch wants writable arrays.
    return torch.from_numpy(np.array(array, copy=True).reshape(t.shape))


@dataclass
class _WeightChange:
    """How far storing some tensors in kvflow's format moved their weights: the relative
    RMS difference over all of them, for the log."""

    squared_error: float = 0.0
    squared_norm: float = 0.0
    tensors: int = 0

    def add(self, exact: torch.Tensor, stored: torch.Tensor) -> None:
        self.squared_error += float((stored - exact).square().sum())
        self.squared_norm += float(exact.square().sum())
        self.tensors += 1

    def add_rounded_groups(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                           dtype: torch.dtype) -> None:
        """Groups w = q * scale + offset whose scale and offset are stored rounded to dtype,
        from each group's sums of q and q^2 (the weights need not be made twice): a group's
        sum of (q * a + b)^2 is a^2 * sum(q^2) + 2ab * sum(q) + n * b^2."""
        rows, groups = scale.shape
        qg = q.view(rows, groups, -1).double()
        sums, squares, n = qg.sum(-1), qg.square().sum(-1), qg.shape[-1]
        scale, offset = scale.double(), offset.double()
        d_scale, d_offset = scale - scale.to(dtype).double(), offset - offset.to(dtype).double()

        def squared(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a * a * squares + 2 * a * b * sums + n * b * b).sum())

        self.squared_error += squared(d_scale, d_offset)
        self.squared_norm += squared(scale, offset)
        self.tensors += 1

    def log(self, what: str) -> None:
        if self.tensors:
            logger.info("GGUF %s: %d tensors, relative RMS change of the weights %.4f%%",
                        what, self.tensors, 100 * (self.squared_error / self.squared_norm) ** 0.5)


def gguf_tensors(file: GgufFile, config: ModelConfig, quant: GgufQuantConfig,
                 dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | PrequantizedWeight]]:
    """(Hugging Face name, what its parameter's weight_loader takes) for every tensor."""
    requantized, rounded = _WeightChange(), _WeightChange()
    for t in file.tensors.values():
        method = _method(quant, t)
        # An expert stack [experts, rows, columns] as one matrix (see the module's docstring)
        rows, columns = math.prod(t.shape[:-1]), t.shape[-1]
        if method == "int4":
            q, scale, offset = _unpermute(file, config, t, _UNPACK[t.type_name](
                np.asarray(t.data), rows, columns))
            if dtype != torch.float32:
                rounded.add_rounded_groups(q, scale, offset, dtype)
            loaded: torch.Tensor | PrequantizedWeight = PrequantizedWeight(
                int4_layout(INT4_GROUP), (pack_int4(q), scale, offset))
        else:
            weight = _unpermute(file, config, t, (dequantize(t),))[0]
            loaded = _unshift_norm(file, t, weight)
            if method == "int8":  # quantized here, once, to measure what it moves
                weight = weight.reshape(rows, columns)
                q, scale = quantize_int8(weight, dtype)
                requantized.add(weight, q.float() * scale.float()[:, None])
                loaded = PrequantizedWeight(INT8_LAYOUT, (q, scale))
        yield t.hf_name, loaded
    requantized.log("Q8_0 -> int8 (requantized per output channel)")
    rounded.log(f"Q4_0/Q4_1/Q4_K -> int4 g{INT4_GROUP} (scales and offsets rounded to "
                f"{str(dtype).removeprefix('torch.')})")


def _unpermute(file: GgufFile, config: ModelConfig, t: GgufTensor,
               parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Undo the q/k row permutation of llama.cpp's converter on every part (all are laid
    out by output row)."""
    if not file.layout.permuted_qk:
        return parts
    heads = {"self_attn.q_proj": config.num_heads, "self_attn.k_proj": config.num_kv_heads}
    for leaf, num_heads in heads.items():
        if f".{leaf}." in t.hf_name:
            order = _qk_row_order(num_heads, parts[0].shape[0])
            return tuple(part[order] for part in parts)
    return parts


def _unshift_norm(file: GgufFile, t: GgufTensor, weight: torch.Tensor) -> torch.Tensor:
    """A norm weight as the checkpoint held it, where the converter added norm_shift to
    every tensor named `*norm.weight` (its rule). In float64, so that the norm's loader
    adding the shift back gets the file's float32 value exactly (for any magnitude above
    2^-29: the subtraction is then exact)."""
    shift = file.layout.norm_shift
    if not shift or not t.hf_name.endswith("norm.weight"):
        return weight
    return weight.double() - shift
