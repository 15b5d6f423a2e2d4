"""What one forward pass needs to know about the batch besides the token ids.

Tokens are flattened without padding, request after request; `query_start_loc` (flash
attention's cu_seqlens_q) says where each request's queries start. The model runner
orders requests by query length, so the short queries (decodes, speculative
verification) form a prefix that a backend can take in one batched call.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from kvflow.core.block_pool import NULL_BLOCK
from kvflow.host_copy import to_device


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32: cu_seqlens_q
    seq_lens: torch.Tensor  # [num_reqs] int32: tokens in the cache once this step's are written
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32, padded with NULL_BLOCK
    query_lens_cpu: list[int]  # host copies, for the loops that must stay on the host
    seq_lens_cpu: list[int]
    # The leading requests whose queries the backend batches in one call (all with at most
    # its max_batched_query_len tokens), and how many tokens they hold.
    num_batched_reqs: int
    num_batched_tokens: int

    def __post_init__(self) -> None:
        # What a backend derives from the step once and reuses in every layer (its own
        # per-step tables). Not a field: never sent to other ranks, which derive their own.
        self.derived: dict[object, object] = {}

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens_cpu)


def padded_block_tables(block_ids: list[list[int]], device: torch.device) -> torch.Tensor:
    """Each request's block table padded with NULL_BLOCK to the longest, on `device`."""
    width = max(len(ids) for ids in block_ids)
    return to_device(torch.tensor([ids + [NULL_BLOCK] * (width - len(ids)) for ids in block_ids],
                                  dtype=torch.int32), device)


def build_metadata(query_lens: list[int], num_computed: list[int], block_tables: torch.Tensor,
                   block_size: int, device: torch.device,
                   max_batched_query_len: int) -> AttentionMetadata:
    """Per-token positions and slots from per-request lists, with tensor ops (no per-token
    Python loop). query_lens must be sorted ascending, as the model runner orders them;
    block_tables: [num_reqs, width] int32 on `device`, each request's blocks padded with
    NULL_BLOCK (the model runner's persistent rows, or padded_block_tables)."""
    num_reqs = len(query_lens)
    lens = torch.tensor(query_lens, dtype=torch.int64)
    computed = torch.tensor(num_computed, dtype=torch.int64)
    cu_lens = torch.zeros(num_reqs + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=cu_lens[1:])
    if max(query_lens) == 1:  # all decodes: one token per request
        row = torch.arange(num_reqs)
        positions = computed
    else:
        row = torch.repeat_interleave(torch.arange(num_reqs), lens)
        positions = computed[row] + torch.arange(int(cu_lens[-1])) - cu_lens[row]
    seq_lens = computed + lens
    # two copies up, not five: the int64 per-token values, then the int32 per-request ones
    positions_on, row_on = to_device(torch.stack([positions, row]), device).unbind(0)
    per_request = to_device(torch.cat([cu_lens, seq_lens]), device, torch.int32)
    # the table is on the device already: the slots are looked up there
    slots = (block_tables[row_on, positions_on // block_size].long() * block_size
             + positions_on % block_size)
    num_batched = bisect.bisect_right(query_lens, max_batched_query_len)
    return AttentionMetadata(
        positions=positions_on,
        slot_mapping=slots,
        query_start_loc=per_request[:num_reqs + 1],
        seq_lens=per_request[num_reqs + 1:],
        block_tables=block_tables,
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens.tolist(),
        num_batched_reqs=num_batched,
        num_batched_tokens=sum(query_lens[:num_batched]),
    )
