"""The pool of KV cache blocks: ids, reference counts, a free queue and the index of cached
blocks that the prefix cache looks prefixes up in.

Block 0 is the null block: it is never handed out, so padded block tables can point at
it without touching a live request's KV.

A block whose reference count falls to zero goes back to the free queue but keeps its KV
and, if it was registered under a hash, its place in the index: until the queue hands it
out again, a request with the same prefix can take it back. The queue hands out first
the blocks least worth keeping: blocks that cache nothing (pushed at the front), then
cached blocks in the order they were freed (pushed at the back), which is least recently
used first. Because a request frees its blocks tail first, a prefix's deeper blocks
always sit ahead of its shallower ones, so leaves go before their parents. Taking a free
block, reviving a cached one from the middle of the queue, and freeing are all O(1).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

NULL_BLOCK = 0

BlockHash = bytes


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set while the block is in the cached-block index
    # Links of the free queue; both None while the block is referenced.
    prev: KVCacheBlock | None = None
    next: KVCacheBlock | None = None


class FreeBlockQueue:
    """A doubly linked list threaded through the blocks themselves, so that removing a
    block from the middle (a cache hit on a free block) is O(1), which a deque is not."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Front to back; for checks, not the hot path."""
        block = self._head.next
        while block is not self._tail:
            yield block
            block = block.next

    def _insert_after(self, anchor: KVCacheBlock, block: KVCacheBlock) -> None:
        assert block.prev is None and block.next is None, f"block {block.block_id} queued twice"
        following = anchor.next
        block.prev, block.next = anchor, following
        anchor.next = following.prev = block  # type: ignore[union-attr]
        self._len += 1

    def append(self, block: KVCacheBlock) -> None:
        self._insert_after(self._tail.prev, block)  # type: ignore[arg-type]

    def appendleft(self, block: KVCacheBlock) -> None:
        self._insert_after(self._head, block)

    def remove(self, block: KVCacheBlock) -> None:
        assert block.prev is not None and block.next is not None, \
            f"block {block.block_id} is not in the free queue"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self._len -= 1

    def popleft(self) -> KVCacheBlock:
        if self._len == 0:
            raise RuntimeError("the free block queue is empty")
        block = self._head.next
        self.remove(block)  # type: ignore[arg-type]
        return block  # type: ignore[return-value]


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        self._free = FreeBlockQueue(self.blocks[1:])
        self._cached: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references, whether or not they still cache a prefix."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by some request (cached free blocks count
        as free: the pool takes them back whenever it needs them)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def allocate(self, count: int) -> list[int]:
        """Fresh blocks, evicting the cached prefixes least worth keeping if need be."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks with {len(self._free)} free")
        block_ids = []
        for _ in range(count):
            block = self._free.popleft()
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            block_ids.append(block.block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks, reviving the free ones."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._free.remove(block)
            block.ref_count += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop a reference on each block, in the order given (give a sequence's tail first)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free.appendleft(block)
                else:
                    self._free.append(block)

    def num_free_among(self, block_ids: Iterable[int]) -> int:
        """How many of these blocks sit in the free queue (touching them takes them out)."""
        return sum(1 for block_id in block_ids if self.blocks[block_id].ref_count == 0)

    def lookup(self, block_hash: BlockHash) -> int | None:
        block = self._cached.get(block_hash)
        return None if block is None else block.block_id

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Index a full block under its hash. If another block already holds that prefix,
        this one stays unindexed and is reused as soon as it is freed."""
        block = self.blocks[block_id]
        if block_hash not in self._cached and block.block_hash is None:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def unregister(self, block_id: int, block_hash: BlockHash) -> None:
        """Take a block out of the index, if it is there under this hash."""
        block = self.blocks[block_id]
        if block.block_hash == block_hash and self._cached.get(block_hash) is block:
            del self._cached[block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (blocks in use keep their KV); returns how many."""
        count = len(self._cached)
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return count

    def check_integrity(self) -> None:
        """Every usable block is either referenced or queued, and the index points only at
        blocks that carry its hash. For tests and debugging: O(num_blocks)."""
        queued = {block.block_id for block in self._free}
        assert len(queued) == len(self._free), "a block is queued twice"
        assert NULL_BLOCK not in queued and self.blocks[NULL_BLOCK].ref_count == 0
        for block in self.blocks[1:]:
            assert (block.ref_count == 0) == (block.block_id in queued), \
                f"block {block.block_id}: ref_count {block.ref_count}, queued " \
                f"{block.block_id in queued}"
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash, f"block {block.block_id} indexed wrongly"
