"""What one forward pass needs to know about the batch besides the token ids.

Tokens are flattened without padding. Requests that compute exactly one token this
step ("decodes") come first and are handled together in one batched attention call;
the prefill chunks follow, one attention call each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillChunk:
    query_start: int  # offset of the chunk's first token in the flat batch
    query_len: int
    num_computed_tokens: int  # tokens already in the cache before this chunk
    block_table: torch.Tensor  # [num_blocks] int64: the request's blocks

    @property
    def context_len(self) -> int:
        return self.num_computed_tokens + self.query_len


@dataclass
class ForwardMetadata:
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    num_decodes: int  # the first num_decodes tokens each belong to a different request
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, null-block padded
    decode_seq_lens: torch.Tensor  # [num_decodes] int64, including the new token
    prefills: list[PrefillChunk]
