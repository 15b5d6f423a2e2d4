"""Which engine core answers a request, under data parallelism (kvflow serve -dp N).

With the "prefix" policy (after SGLang's cache-aware routing), a request goes to the core
that holds the longest prefix of its prompt, so that the turns of a conversation find
their KV where it was computed; when no core holds at least cache_threshold of the
prompt, to the least loaded core instead. A core that holds the prefix but has
balance_threshold more requests than the least loaded one is passed over.

A prefix that many different prompts continue (a system prompt, a shared document) binds
no request to a core: every core soon holds it, each computing it once, so a request
that matches only such a prefix goes to the least loaded core. Without this, the first
core to compute a system prompt would draw every new conversation until the balance
threshold, and keep them, since each conversation's later turns follow its history: on
a paced chat trace, nearly every conversation on one of two cores.

The router cannot see into the cores' caches (they are in other processes), so it keeps
its own view of each: the block keys of the prompts it sent there, the most recently
sent kept, as many as the core's KV pool has blocks. A core's pool evicts the tails of
sequences first; so does this view, which touches a prompt's keys from its last block to
its first, keeping every chain's head the longest.
"""
from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvflow.core.block_pool import BlockHash
from kvflow.core.kv_manager import extend_block_hashes, root_hash

ROUTING_POLICIES = ("prefix", "round-robin", "least-loaded")
# Why a core was chosen: it held the prefix; it held it but was too busy, so the least
# loaded core instead; no core held enough of it; the policy's turn; the least loaded.
DECISIONS = ("prefix", "balance", "no-prefix", "round-robin", "least-loaded")
# A block that this many different blocks have followed ends a shared prefix.
SHARED_FANOUT = 4


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "prefix"
    # The share of a prompt a core must hold for the prefix to choose it.
    cache_threshold: float = 0.5
    # Requests a prefix's core may have beyond the least loaded core's and still be chosen.
    balance_threshold: int = 8

    def __post_init__(self) -> None:
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"data-parallel routing must be one of {ROUTING_POLICIES}, "
                             f"got {self.policy!r}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"the routing cache threshold must be in [0, 1], "
                             f"got {self.cache_threshold}")
        if self.balance_threshold < 0:
            raise ValueError(f"the routing balance threshold must be at least 0, "
                             f"got {self.balance_threshold}")


@dataclass(frozen=True)
class Route:
    core: int
    decision: str  # one of DECISIONS
    matched_tokens: int  # of the prompt, held by the chosen core as the router sees it


class CacheView:
    """The block keys a core is believed to hold, least recently sent first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[BlockHash, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def matched(self, keys: Sequence[BlockHash]) -> int:
        """How many of keys, from the first, it holds."""
        for count, key in enumerate(keys):
            if key not in self._keys:
                return count
        return len(keys)

    def insert(self, keys: Sequence[BlockHash]) -> None:
        for key in reversed(keys):
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def clear(self) -> None:
        self._keys.clear()


class Router:
    def __init__(self, config: RoutingConfig, num_cores: int, block_size: int,
                 capacity_blocks: int) -> None:
        self.config = config
        self.block_size = block_size
        self.views = [CacheView(capacity_blocks) for _ in range(num_cores)]
        self.decisions: list[Counter[str]] = [Counter() for _ in range(num_cores)]
        self._turn = itertools.count()
        # block key -> the keys that followed it (up to SHARED_FANOUT), least recent first
        self._next: OrderedDict[BlockHash, set[BlockHash]] = OrderedDict()
        self._next_capacity = capacity_blocks * num_cores

    def route(self, token_ids: Sequence[int], cache_salt: str | None, loads: Sequence[int],
              live: Sequence[bool]) -> Route:
        """The core for a prompt, given each core's load (sequences it is answering) and
        whether it serves; raises ValueError when none does."""
        candidates = [i for i, up in enumerate(live) if up]
        if not candidates:
            raise ValueError("no engine core is serving")
        # Full blocks only, and not the last token's: a core computes at least that one.
        keys = extend_block_hashes([], root_hash("", cache_salt), token_ids, self.block_size,
                                   (len(token_ids) - 1) // self.block_size)
        matched = {i: self.views[i].matched(keys) for i in candidates}
        route = self._choose(candidates, matched, self._shared(keys), loads, len(token_ids))
        self.views[route.core].insert(keys)
        self._follow(keys)
        self.decisions[route.core][route.decision] += 1
        return route

    def _shared(self, keys: Sequence[BlockHash]) -> int:
        """How many of keys, from the first, make a prefix many prompts share."""
        depth = 0
        for index, key in enumerate(keys):
            followers = self._next.get(key)
            if followers is None:
                break
            if len(followers) >= SHARED_FANOUT:
                depth = index + 1
        return depth

    def _follow(self, keys: Sequence[BlockHash]) -> None:
        for key, follower in zip(keys, keys[1:]):
            followers = self._next.setdefault(key, set())
            if len(followers) < SHARED_FANOUT:
                followers.add(follower)
            self._next.move_to_end(key)
        while len(self._next) > self._next_capacity:
            self._next.popitem(last=False)

    def _choose(self, candidates: list[int], matched: dict[int, int], shared: int,
                loads: Sequence[int], num_tokens: int) -> Route:
        policy = self.config.policy
        turn = next(self._turn)
        if policy == "round-robin":
            core = candidates[turn % len(candidates)]
            return Route(core, "round-robin", matched[core] * self.block_size)
        # Equal loads take turns, so that an idle server does not send all to core 0.
        least = min(candidates, key=lambda i: (loads[i], (i - turn) % len(candidates)))
        if policy == "least-loaded":
            return Route(least, "least-loaded", matched[least] * self.block_size)
        best = max(candidates, key=lambda i: (matched[i], -loads[i]))
        best_tokens = matched[best] * self.block_size
        if matched[best] <= shared or best_tokens < self.config.cache_threshold * num_tokens:
            return Route(least, "no-prefix", matched[least] * self.block_size)
        if loads[best] - loads[least] > self.config.balance_threshold:
            return Route(least, "balance", matched[least] * self.block_size)
        return Route(best, "prefix", best_tokens)

    def forget(self, core: int) -> None:
        """A core's cache is gone (it stopped, or was reset)."""
        self.views[core].clear()
