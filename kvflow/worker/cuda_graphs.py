"""CUDA graphs for decode steps: a step's thousands of kernel launches replayed as one.

At startup the runner captures a decode step's forward pass and LM head for each batch
size of a ladder (vLLM's: 1, 2, 4, then every multiple of 8 up to the largest), the
largest first, all in one memory pool. A later decode step of n requests (one query token
each) copies its inputs into the static buffers the graphs read, padded to the smallest
captured size at least n, and replays that graph. A padding row writes no KV (its slot is
-1), attends to one key of the null block, and its logits are dropped.

What a graph fixes at capture, and so what must not change under it: the buffers'
addresses (they are allocated once, here), the KV cache's (`stale` notices a rebound
cache, and the graphs are captured again), the weights, and each kernel's launch
configuration. The attention backend's split of long contexts is chosen at capture as for
contexts of max_model_len tokens, so the graph serves any length.
"""
from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from kvflow.attention.metadata import AttentionMetadata
from kvflow.core.block_pool import NULL_BLOCK
from kvflow.core.kv_manager import cdiv
from kvflow.host_copy import CopyFence
from kvflow.layers.moe import FusedMoE

if TYPE_CHECKING:
    from kvflow.attention.base import AttentionBackend
    from kvflow.models.blocks import CausalLM
    from kvflow.outputs import ScheduledRequest

logger = logging.getLogger(__name__)

DEFAULT_MAX_CAPTURE_SIZE = 512

Replay = Callable[[], torch.Tensor]


class Capture(Protocol):
    def __call__(self, forward: Replay) -> Replay:
        """A callable that runs `forward` again (reading the same buffers) and returns
        its result."""


def capture_sizes(max_num_seqs: int, sizes: list[int] | None = None,
                  max_capture_size: int | None = None) -> list[int]:
    """The batch sizes to capture, ascending. sizes: vLLM's --cuda-graph-sizes: None for
    the default ladder up to min(max_num_seqs, max_capture_size or 512); one value for
    the ladder up to it; several for those sizes exactly."""
    if max_capture_size is not None and max_capture_size < 1:
        raise ValueError(f"max_cudagraph_capture_size must be at least 1, got "
                         f"{max_capture_size}")
    if sizes is not None and (not sizes or any(size < 1 for size in sizes)):
        raise ValueError(f"cuda_graph_sizes must be positive batch sizes, got {sizes}")
    limit = min(max_num_seqs, max_capture_size or DEFAULT_MAX_CAPTURE_SIZE)
    if sizes is None or len(sizes) == 1:
        top = limit if sizes is None else min(sizes[0], limit)
        # and the top itself, so that every batch up to it has a graph
        sizes = [1, 2, 4] + list(range(8, top + 1, 8)) + [top]
    return sorted({size for size in sizes if size <= limit})


def why_not_captured(model: CausalLM, backend: AttentionBackend,
                     device: torch.device) -> str | None:
    """Why this model's steps cannot be captured on `device` (None: they can)."""
    if not backend.capturable:
        return "the attention backend cannot be captured"
    # An expert layer that reads its routing back to the host sizes its work by the data,
    # which a capture cannot hold. On the CPU the native kernel routes inside its call;
    # on CUDA only Triton's routes on the device (experts kept on the host do not).
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    if any(not m.routes_on_device if device.type == "cuda" else m.plan is None
           for m in experts):
        return "expert layers read their routing on the host"
    return None


def padded_size(num_reqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds num_reqs (None: larger than every one)."""
    index = bisect.bisect_left(sizes, num_reqs)
    return sizes[index] if index < len(sizes) else None


def cuda_capture(pool: object) -> Capture:
    """Captures into torch.cuda.CUDAGraphs sharing one memory pool."""

    def capture(forward: Replay) -> Replay:
        forward()  # warm-up: Triton compiles, cuBLAS picks its kernels and workspace
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


class DecodeBuffers:
    """The inputs a captured step reads, allocated once at the largest size, and their
    host staging (pinned on CUDA, so that the copies do not wait). Block tables come from
    the requests' persistent rows (the model runner's), gathered on the device.

    A step of `queries` tokens per request lays each request's out as its padding first
    (tokens that write no KV and whose outputs are dropped), then its last token and its
    drafts: a request's real queries are the last positions of its sequence, as the
    attention backends read them, whatever number of drafts it has."""

    def __init__(self, max_size: int, queries: list[int], max_blocks_per_seq: int,
                 device: torch.device) -> None:
        """queries: the tokens per request of the steps captured."""
        pin = device.type == "cuda"
        max_tokens = max_size * max(queries)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_size, dtype=torch.int32, device=device)
        self.query_start_locs = {
            count: torch.arange(0, max_size * count + 1, count, dtype=torch.int32,
                                device=device) for count in queries}
        self.block_tables = torch.full((max_size, max_blocks_per_seq), NULL_BLOCK,
                                       dtype=torch.int32, device=device)
        self.rows = torch.zeros(max_size, dtype=torch.int64, device=device)
        self._staged = torch.empty(3, max_tokens, dtype=torch.int64, pin_memory=pin)
        self._staged_rows = torch.empty(max_size, dtype=torch.int64, pin_memory=pin)
        self._staged_lens = torch.empty(max_size, dtype=torch.int32, pin_memory=pin)
        # the staging is written again only once the last step's copies out of it have run
        self._fence = CopyFence(device)
        # On the CPU, fill() writes the buffers through these views.
        self._host = (tuple(buffer.numpy() for buffer in (
            self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables))
            if device.type == "cpu" else None)

    def fill(self, batch: list[ScheduledRequest], size: int, queries: int, block_size: int,
             table: torch.Tensor, rows: list[int]) -> None:
        """The step's requests into the first rows, padding rows after them up to size.
        A padding row writes no KV (slot -1); its block table keeps what it held, of
        which it reads one key. table: the persistent block tables, rows: the requests'
        rows of it."""
        if self._host is not None:
            self._fill_on_host(batch, size, queries, block_size, table, rows)
        else:
            self._fill_on_device(batch, size, queries, block_size, table, rows)

    def _fill_on_host(self, batch: list[ScheduledRequest], size: int, queries: int,
                      block_size: int, table: torch.Tensor, rows: list[int]) -> None:
        """fill() where the buffers are host memory: written in place through numpy, with
        no staging, copies or dispatch. The two dozen torch ops of the device's way took
        0.43 ms of a 22 ms int8 decode step on a Xeon, each run cold after the weights
        had streamed through the caches."""
        n, count = len(batch), size * queries
        drafts = np.fromiter((len(r.draft_token_ids) for r in batch), np.int64, n)
        first = np.fromiter((r.num_computed_tokens for r in batch), np.int64, n)
        pads = (queries - 1 - drafts)[:, None]
        column = np.arange(queries)
        ids, positions, slots, lens, tables = self._host
        ids, positions, slots, lens, tables = (
            ids[:count], positions[:count], slots[:count], lens[:size], tables[:size])
        ids[n * queries:], positions[n * queries:], slots[n * queries:] = 0, 0, -1
        ids[:n * queries] = (
            [r.token_ids[0] for r in batch] if queries == 1 else
            [t for r in batch
             for t in [0] * (queries - 1 - len(r.draft_token_ids)) + r.token_ids[:1]
             + r.draft_token_ids])
        real = np.maximum(first[:, None] - pads + column, 0)
        positions[:n * queries] = real.reshape(-1)
        tables[:n] = table.numpy()[rows, :tables.shape[1]]
        looked_up = (tables[np.arange(n)[:, None], real // block_size].astype(np.int64)
                     * block_size + real % block_size)
        slots[:n * queries] = np.where(column < pads, -1, looked_up).reshape(-1)
        lens[:n] = first + 1 + drafts
        lens[n:] = 1

    def _fill_on_device(self, batch: list[ScheduledRequest], size: int, queries: int,
                        block_size: int, table: torch.Tensor, rows: list[int]) -> None:
        n = len(batch)
        count = size * queries
        drafts = torch.tensor([len(r.draft_token_ids) for r in batch], dtype=torch.int64)
        first = torch.tensor([r.num_computed_tokens for r in batch], dtype=torch.int64)
        pads = (queries - 1 - drafts).unsqueeze(1)
        column = torch.arange(queries)
        self._fence.wait()
        staged = self._staged[:, :count]
        staged[:, n * queries:] = torch.tensor([[0], [0], [-1]])  # the padding rows
        staged[0, :n * queries] = torch.tensor(
            [r.token_ids[0] for r in batch] if queries == 1 else
            [t for r in batch
             for t in [0] * (queries - 1 - len(r.draft_token_ids)) + r.token_ids[:1]
             + r.draft_token_ids])
        # a request's padding sits just before its real queries, never before position 0
        staged[1, :n * queries] = (first.unsqueeze(1) - pads + column).clamp_(min=0).view(-1)
        staged[2, :n * queries] = torch.where(column < pads, -1, 0).view(-1)
        staged_rows = self._staged_rows[:n]
        staged_rows.copy_(torch.tensor(rows))
        lens = self._staged_lens[:size]
        lens[:n] = first + 1 + drafts
        lens[n:] = 1
        self.input_ids[:count].copy_(staged[0], non_blocking=True)
        self.positions[:count].copy_(staged[1], non_blocking=True)
        self.slot_mapping[:count].copy_(staged[2], non_blocking=True)
        self.seq_lens[:size].copy_(lens, non_blocking=True)
        self.rows[:n].copy_(staged_rows, non_blocking=True)
        self._fence.mark()
        tables = self.block_tables[:size]
        torch.index_select(table.narrow(1, 0, tables.shape[1]), 0, self.rows[:n],
                           out=tables[:n])
        # The slots are looked up in the gathered rows on the device; a token staged -1
        # (padding) keeps -1.
        positions = self.positions[:count].view(size, queries)
        looked_up = (tables.gather(1, positions // block_size).long() * block_size
                     + positions % block_size).view(-1)
        slots = self.slot_mapping[:count]
        torch.where(slots < 0, slots, looked_up, out=slots)

    def metadata(self, size: int, queries: int, max_model_len: int) -> AttentionMetadata:
        """Views of the buffers for `size` requests of `queries` tokens; the host lists
        describe the worst case (contexts of max_model_len), so that a backend's launch
        choices hold for any."""
        count = size * queries
        return AttentionMetadata(
            positions=self.positions[:count], slot_mapping=self.slot_mapping[:count],
            query_start_loc=self.query_start_locs[queries][:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
            query_lens_cpu=[queries] * size, seq_lens_cpu=[max_model_len] * size,
            num_batched_reqs=size, num_batched_tokens=count)


class DecodeGraphs:
    """The captured steps of one model and KV cache, and which steps may use one: decodes
    (one query token per request) and, with speculative decoding of k drafts, verification
    (k + 1 per request, fewer drafts padded), at the sizes whose tokens fit the largest
    decode batch."""

    def __init__(self, model: CausalLM, sizes: list[int], block_size: int, max_model_len: int,
                 device: torch.device, capture: Capture, num_drafts: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.capture = capture
        # queries per request -> the batch sizes captured with that many
        self.sizes = {1: sizes}
        verify = [size for size in sizes if size * (num_drafts + 1) <= sizes[-1]]
        if num_drafts and verify:
            self.sizes[num_drafts + 1] = verify
        self.buffers = DecodeBuffers(sizes[-1], list(self.sizes),
                                     cdiv(max_model_len, block_size), device)
        self.graphs: dict[tuple[int, int], Replay] = {}
        self._first_attention = model.attention_layers()[0]
        self._captured_cache: int | None = None

    def capture_all(self) -> None:
        start = time.perf_counter()
        self.graphs.clear()
        for queries, sizes in self.sizes.items():
            for size in reversed(sizes):  # the largest first: the smaller reuse its pool
                meta = self.buffers.metadata(size, queries, self.max_model_len)
                input_ids = self.buffers.input_ids[:size * queries]
                self.graphs[size, queries] = self.capture(
                    lambda input_ids=input_ids, meta=meta: self.model.compute_logits(
                        self.model(input_ids, meta)))
        self._captured_cache = self._cache_address()
        logger.info("decode graphs: batch sizes %s captured in %.1f s", ", ".join(
            f"{sizes[0]}-{sizes[-1]} of {queries} token{'s' if queries > 1 else ''}"
            for queries, sizes in self.sizes.items()), time.perf_counter() - start)

    def _cache_address(self) -> int:
        return self._first_attention.k_cache.data_ptr()

    @property
    def stale(self) -> bool:
        """The KV cache was bound again since the capture (the graphs read the old one)."""
        return self._captured_cache != self._cache_address()

    def queries_of(self, batch: list[ScheduledRequest]) -> int | None:
        """The tokens per request of the graphs that take this batch (None: none does):
        every request one token and at most the drafts verified, few enough requests."""
        if any(len(r.token_ids) != 1 for r in batch):
            return None
        drafts = max(len(r.draft_token_ids) for r in batch)
        queries = 1 if drafts == 0 else max(self.sizes)
        if queries not in self.sizes or drafts + 1 > queries:
            return None
        return queries if len(batch) <= self.sizes[queries][-1] else None

    @staticmethod
    def query_starts(batch: list[ScheduledRequest], queries: int) -> dict[str, int]:
        """Where each request's real queries start among the rows of a graph of `queries`
        tokens per request."""
        return {r.req_id: row * queries + queries - 1 - len(r.draft_token_ids)
                for row, r in enumerate(batch)}

    def run(self, batch: list[ScheduledRequest], queries: int, table: torch.Tensor,
            rows: list[int], substitute: Callable[[torch.Tensor], None] | None = None
            ) -> torch.Tensor:
        """The logits of every row of the batch's requests through the graph of `queries`
        tokens per request (queries_of; query_starts says where each request's rows are),
        [len(batch) * queries, vocab]: a view of the graph's output, valid until the next
        replay. table, rows: the persistent block tables and the requests' rows of it.
        substitute: puts the tokens a step in flight sampled in place of placeholders
        (async scheduling) in the input ids."""
        if self.stale:
            logger.info("decode graphs: the KV cache was bound again; capturing again")
            self.capture_all()
        size = padded_size(len(batch), self.sizes[queries])
        self.buffers.fill(batch, size, queries, self.block_size, table, rows)
        if substitute is not None:
            substitute(self.buffers.input_ids)
        return self.graphs[size, queries]()[:len(batch) * queries]
