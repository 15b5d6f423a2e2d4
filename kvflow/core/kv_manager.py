"""KV cache bookkeeping for the scheduler: which blocks each request holds.

It sees only ints and lists; the tensors live in the model runner.
"""
from __future__ import annotations

from kvflow.core.block_pool import BlockPool
from kvflow.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return self.num_blocks_for(num_tokens) <= self.pool.num_usable_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block table to hold num_new_tokens more; False if the pool is short."""
        total = request.num_computed_tokens + num_new_tokens
        needed = self.num_blocks_for(total) - len(request.block_ids)
        if needed <= 0:
            return True
        if needed > self.pool.num_free_blocks:
            return False
        request.block_ids.extend(self.pool.allocate(needed))
        return True

    def free(self, request: Request) -> None:
        # Tail blocks first, so that a later prefix cache evicts a sequence's end before its start.
        self.pool.free(request.block_ids[::-1])
        request.block_ids = []
