"""MXFP4 (the OCP microscaling format gpt-oss's experts are published in), read at load.

A weight row is cut into blocks of 32 values; each value is a 4-bit float (E2M1: sign,
two exponent bits, one mantissa bit, so one of 0, 0.5, 1, 1.5, 2, 3, 4 and 6 either
side of zero), packed two to a byte with the lower nibble first, and each block has a
power-of-two scale stored as a biased 8-bit exponent (E8M0: 2 ** (byte - 127)).
A checkpoint holds a projection as `<name>_blocks` [..., rows, blocks, 16] (uint8) and
`<name>_scales` [..., rows, blocks].

kvflow has no MXFP4 kernel yet: the values are expanded to bfloat16, which holds every
one of them exactly, and the layer then takes the model's format (its dtype, or int8 or
int4 with --quantization).
"""
from __future__ import annotations

import torch

BLOCK = 32
# The E2M1 value of each 4-bit code.
VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
          -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
_CHUNK = 1 << 20  # blocks


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., rows, blocks, 16] uint8 codes and [..., rows, blocks] uint8 exponents ->
    [..., rows, blocks * 32] bfloat16, exactly; ValueError naming what does not fit."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, not {blocks.dtype} and "
                         f"{scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks of shape {tuple(blocks.shape)} and scales of shape "
                         f"{tuple(scales.shape)}: blocks must be [..., {BLOCK // 2}] bytes, "
                         "one scale each")
    values = torch.tensor(VALUES, dtype=torch.bfloat16)
    # Each byte's two values side by side, read as one int32: one lookup per byte.
    pairs = torch.stack([values.repeat(16), values.repeat_interleave(16)], dim=-1)
    pairs = pairs.contiguous().view(torch.int32).flatten()
    out = torch.empty(*scales.shape, BLOCK, dtype=torch.bfloat16)
    flat_out, flat_codes = out.view(-1, BLOCK), blocks.reshape(-1, BLOCK // 2)
    flat_scales = scales.reshape(-1, 1)
    # A chunk of blocks at a time: the int64 indices take 8 bytes a byte.
    for first in range(0, flat_out.shape[0], _CHUNK):
        part, codes = flat_out[first:first + _CHUNK], flat_codes[first:first + _CHUNK]
        part.view(torch.int32).copy_(pairs[codes.long()])
        # A power of two: exact in bfloat16, whose exponent range is float32's.
        exponents = flat_scales[first:first + _CHUNK].float() - SCALE_BIAS
        part.mul_(torch.exp2(exponents).to(torch.bfloat16))
    return out.flatten(-2)
