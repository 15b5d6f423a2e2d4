"""Per-request step state that stays on the device from one step to the next.

Each running request holds a row of a device block table for as long as it runs. A step
writes only what changed since the last: a new request's whole row, the blocks a request
gained (a decode gains one every block_size tokens), a row written again after the
request was preempted and came back with other blocks. The changes are made in a pinned
host mirror and copied up in one transfer; a step then gathers its requests' rows on the
device. Rebuilding every row from Python lists instead costs a 256-request decode step of
a 4k context about 16,000 list elements.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvflow.core.block_pool import NULL_BLOCK
from kvflow.host_copy import CopyFence, tensor_on

if TYPE_CHECKING:
    from kvflow.outputs import ScheduledRequest


@dataclass
class _Row:
    index: int
    num_blocks: int
    num_preemptions: int


class PersistentBlockTables:
    def __init__(self, max_blocks_per_seq: int, device: torch.device, rows: int = 8) -> None:
        """max_blocks_per_seq: the columns to start with; rows and columns grow when a
        step needs more."""
        self.device = device
        self.table = torch.full((rows, max_blocks_per_seq), NULL_BLOCK, dtype=torch.int32,
                                device=device)
        self._host = torch.full((rows, max_blocks_per_seq), NULL_BLOCK, dtype=torch.int32,
                                pin_memory=device.type == "cuda")
        # The copy up from the mirror is queued behind the step in flight (async
        # scheduling): the mirror is written again only once that copy has run.
        self._fence = CopyFence(device)
        self._rows: dict[str, _Row] = {}
        self._free = list(range(rows - 1, -1, -1))  # lowest row first
        # rows [0, dirty_rows) and columns [0, dirty_columns) hold changes not yet copied up
        self._dirty_rows = self._dirty_columns = 0

    def update(self, batch: list[ScheduledRequest]) -> list[int]:
        """Each request's row, after its changes since the last update are written."""
        newcomers = sum(r.req_id not in self._rows for r in batch)
        if len(self._free) < newcomers:
            # rows of requests no longer scheduled (finished or preempted without being
            # forgotten yet) give way to the step's
            self.forget(set(self._rows) - {r.req_id for r in batch})
        self._fence.wait()
        self._grow(len(self._rows) + newcomers, max((len(r.block_ids) for r in batch), default=0))
        indices = []
        for request in batch:
            row = self._rows.get(request.req_id)
            blocks = request.block_ids
            if (row is None or row.num_preemptions != request.num_preemptions
                    or row.num_blocks > len(blocks)):
                if row is None:
                    row = self._rows[request.req_id] = _Row(self._free.pop(), 0, 0)
                row.num_blocks, row.num_preemptions = 0, request.num_preemptions
            if len(blocks) > row.num_blocks:
                self._host[row.index, row.num_blocks:len(blocks)] = torch.tensor(
                    blocks[row.num_blocks:], dtype=torch.int32)
                row.num_blocks = len(blocks)
                self._dirty_rows = max(self._dirty_rows, row.index + 1)
                self._dirty_columns = max(self._dirty_columns, len(blocks))
            indices.append(row.index)
        if self._dirty_rows:
            region = (slice(0, self._dirty_rows), slice(0, self._dirty_columns))
            self.table[region].copy_(self._host[region], non_blocking=True)
            self._fence.mark()
            self._dirty_rows = self._dirty_columns = 0
        return indices

    def gather(self, indices: list[int], width: int) -> torch.Tensor:
        """The first `width` blocks of these rows, [len(indices), width], on the device."""
        rows = tensor_on(indices, self.device, torch.int64)
        return self.table.narrow(1, 0, width).index_select(0, rows)

    def forget(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            row = self._rows.pop(req_id, None)
            if row is not None:
                self._free.append(row.index)
        self._free.sort(reverse=True)

    def _grow(self, rows: int, columns: int) -> None:
        """At least this many rows and columns, the rows held kept."""
        old_rows, old_columns = self.table.shape
        if rows <= old_rows and columns <= old_columns:
            return
        new_rows, new_columns = max(rows, 2 * old_rows), max(columns, old_columns)
        table = torch.full((new_rows, new_columns), NULL_BLOCK, dtype=torch.int32,
                           device=self.device)
        table[:old_rows, :old_columns] = self.table
        host = torch.full((new_rows, new_columns), NULL_BLOCK, dtype=torch.int32,
                          pin_memory=self.device.type == "cuda")
        host[:old_rows, :old_columns] = self._host
        self.table, self._host = table, host
        self._free = sorted(self._free + list(range(old_rows, new_rows)), reverse=True)

    def __len__(self) -> int:
        return len(self._rows)
