"""GGML block formats written from float weights, for kvflow/bench/gguf_export.py.

The gguf package quantizes F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 but not the
K-quants, so `quantize_q4_k`, `quantize_q5_k` and `quantize_q6_k` here write valid blocks
with a plain round-to-nearest search (llama.cpp's own quantizer searches scales harder;
the block layout is the same, and the gguf package's dequantizers read them back).
"""
from __future__ import annotations

import numpy as np


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape[:-1], -1)


def _k_quant(weight: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Q4_K's and Q5_K's shared part, [rows, cols] float32 (cols a multiple of 256) ->
    (d, dmin, the twelve bytes of 6-bit scales and mins, q [rows, cols / 256, 8, 32] in
    [0, levels]): per super-block of 256 an fp16 d and dmin, per sub-block of 32 a 6-bit
    scale and min (w = d * sc * q - dmin * m)."""
    rows, cols = weight.shape
    sub = weight.reshape(rows, cols // 256, 8, 32).astype(np.float32)
    low = np.minimum(sub.min(axis=-1), 0)  # llama.cpp's mins are never positive
    step = (sub.max(axis=-1) - low) / levels
    d = (step.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    dmin = ((-low).max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(step / np.where(d > 0, d, 1)[..., None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(-low / np.where(dmin > 0, dmin, 1)[..., None]), 0, 63).astype(np.uint8)
    scale = d[..., None] * sc
    q = np.rint((sub + (dmin[..., None] * m)[..., None]) / np.where(scale > 0, scale, 1)[..., None])
    # Sub-blocks 0-3 keep six bits in the first two rows of four bytes; 4-7 put four bits
    # in the third row and their top two in the first two rows' spare bits.
    packed = np.concatenate([
        sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
        m[..., :4] | ((m[..., 4:] >> 4) << 6),
        (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
    ], axis=-1)
    return _f16_bytes(d[..., None]), _f16_bytes(dmin[..., None]), packed, \
        np.clip(q, 0, levels).astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """The low four bits of q [rows, blocks, 8, 32] in 64-weight runs: sub-block 2r's
    element j in byte j's low nibble, sub-block 2r + 1's in its high one."""
    pairs = (q & 15).reshape(*q.shape[:2], 4, 2, 32)
    return (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).reshape(*q.shape[:2], 128)


def quantize_q4_k(weight: np.ndarray) -> np.ndarray:
    """-> Q4_K bytes [rows, cols / 256 * 144]: d, dmin, scales, then the nibbles."""
    d, dmin, scales, q = _k_quant(weight, 15)
    return np.concatenate([d, dmin, scales, _nibbles(q)], axis=-1).reshape(len(weight), -1)


def quantize_q5_k(weight: np.ndarray) -> np.ndarray:
    """-> Q5_K bytes [rows, cols / 256 * 176]: d, dmin, scales, 32 bytes whose bit i of
    byte j is the fifth bit of sub-block i's element j, then the low nibbles as Q4_K's."""
    d, dmin, scales, q = _k_quant(weight, 31)
    bits = (q >> 4).astype(np.uint16) << np.arange(8, dtype=np.uint16)[:, None]
    high = bits.sum(axis=-2).astype(np.uint8)
    return np.concatenate([d, dmin, scales, high, _nibbles(q)], axis=-1).reshape(len(weight), -1)


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


_K_QUANTS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(weight: np.ndarray, type_name: str) -> np.ndarray:
    """[..., rows, cols] float32 (a stack of experts' matrices too) -> the blocks of a GGML
    type, as bytes (or values) per row."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    if type_name in _K_QUANTS:  # blocks run along rows, so a stack's rows are one matrix's
        rows = _K_QUANTS[type_name](weight.reshape(-1, weight.shape[-1]))
        return rows.reshape(*weight.shape[:-1], rows.shape[-1])
    return gguf_quantize(weight, GGMLQuantizationType[type_name])
