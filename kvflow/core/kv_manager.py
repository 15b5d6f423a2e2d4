"""KV cache bookkeeping for the scheduler: which blocks each request holds, and which
prefixes are already in the cache.

It sees only ints and lists; the tensors live in the model runner.

The prefix cache works at block granularity with chained block hashes (as vLLM does):
block i of a sequence is keyed by a hash of block i-1's key and block i's token ids, and
block 0's parent is a root key made of the engine's cache identity (model, dtype, block
size) and the request's cache_salt, so requests that must not share KV never meet. Only
full blocks are keyed: a partly filled block is never shared. A lookup walks a request's
keys until the first miss, so it costs O(prefix length); the hashes are SHA-256, so two
different prefixes never share a key in practice, and each request's keys are computed
once, as its tokens become known.

A block is registered as soon as a step is scheduled to fill it, not after: a request
admitted later in the same step may share it, because every attention backend writes the
whole batch's KV of a layer before any request reads it (AttentionBackend.forward). The
engine confirms those registrations once the step has run, or takes them back if it
failed, so that a block whose KV was never written is never found.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from kvflow.core.block_pool import BlockHash, BlockPool
from kvflow.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def root_hash(cache_identity: str, cache_salt: str | None) -> BlockHash:
    """Block 0's parent key: requests share KV only under equal identities and salts."""
    key = f"{cache_identity}\x00{'' if cache_salt is None else 'salt:' + cache_salt}"
    return hashlib.sha256(key.encode()).digest()


def extend_block_hashes(hashes: list[BlockHash], root: BlockHash, token_ids: Sequence[int],
                        block_size: int, num_blocks: int) -> list[BlockHash]:
    """Extends `hashes` (the keys of a sequence's first full blocks, in place) to the keys
    of its first num_blocks; root is block 0's parent, read only when hashes is empty."""
    parent = hashes[-1] if hashes else root
    for index in range(len(hashes), num_blocks):
        chunk = array("q", token_ids[index * block_size:(index + 1) * block_size]).tobytes()
        parent = hashlib.sha256(parent + chunk).digest()
        hashes.append(parent)
    return hashes


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up in the cache at admission, and how many of them were found."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 cache_identity: str = "") -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_caching = enable_caching
        self.cache_identity = cache_identity
        self.stats = PrefixCacheStats()
        self._num_registered: dict[str, int] = {}  # request id -> its blocks in the index
        self._unconfirmed: list[tuple[int, BlockHash]] = []  # registered by the coming step

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """The keys of the request's first num_blocks full blocks, extending its memo."""
        root = b"" if request.block_hashes else root_hash(self.cache_identity,
                                                          request.cache_salt)
        return extend_block_hashes(request.block_hashes, root, request.all_token_ids,
                                   self.block_size, num_blocks)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of a request not yet holding blocks: (block ids, tokens).
        The last token is never a hit, so that the step computes logits to sample from.
        Requests that asked for prompt logprobs compute every position and look nothing up."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_ids = []
        for block_hash in self._block_hashes(request, max_blocks):
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_block_ids: list[int] | None = None,
                       num_lookahead_tokens: int = 0) -> bool:
        """Grow the request's block table to hold num_new_tokens more, after the cached
        blocks computed_block_ids (for a request being admitted), plus num_lookahead_tokens
        slots for tokens that are not the request's own yet (drafts to verify, proposals to
        come): those are never registered in the prefix cache. False if the pool is short,
        in which case nothing changes."""
        computed = computed_block_ids or []
        total = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        needed = (self.num_blocks_for(total + num_lookahead_tokens) - len(request.block_ids)
                  - len(computed))
        if max(needed, 0) + self.pool.num_free_among(computed) > self.pool.num_free_blocks:
            return False
        # Revive the hits before allocating, so that allocation cannot evict them.
        self.pool.touch(computed)
        request.block_ids.extend(computed)
        if needed > 0:
            request.block_ids.extend(self.pool.allocate(needed))
        if self.enable_caching:
            # a block holding a placeholder is registered once its token is known
            self._register_full_blocks(request, min(total, request.num_known_tokens)
                                       // self.block_size)
        return True

    def _register_full_blocks(self, request: Request, num_full: int) -> None:
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for index in range(start, num_full):
            self.pool.register(request.block_ids[index], hashes[index])
            self._unconfirmed.append((request.block_ids[index], hashes[index]))
        self._num_registered[request.request_id] = num_full

    @property
    def num_unconfirmed(self) -> int:
        return len(self._unconfirmed)

    def confirm_registered(self, count: int | None = None) -> None:
        """A step ran: the blocks it filled hold their KV. count: the registrations made
        up to that step's scheduling (None: all); later ones are a later step's, which
        is still in flight."""
        del self._unconfirmed[:count]

    def unregister_unconfirmed(self) -> None:
        """The step failed: drop what it registered from the index."""
        for block_id, block_hash in self._unconfirmed:
            self.pool.unregister(block_id, block_hash)
        self._unconfirmed.clear()

    def record_admission(self, request: Request, num_cached_tokens: int) -> None:
        """Counts a request's first admission only: a preempted request resuming from its
        own blocks is not a prompt served from the cache."""
        if (self.enable_caching and request.sampling_params.prompt_logprobs is None
                and request.num_cached_tokens is None):
            self.stats.queries += request.num_tokens
            self.stats.hits += num_cached_tokens

    def free(self, request: Request) -> None:
        # Tail blocks first: the free queue then evicts a sequence's end before its start.
        self.pool.free(request.block_ids[::-1])
        request.block_ids = []
        self._num_registered.pop(request.request_id, None)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; returns how many blocks were cached. Running requests
        keep their blocks; what they register later is keyed under prefixes no longer in the
        index, so it is found only once those prefixes are computed and cached again, when
        its KV is exactly what they would compute."""
        return self.pool.reset_prefix_cache()
