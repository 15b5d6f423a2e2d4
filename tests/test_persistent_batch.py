"""The persistent block tables (kvflow/worker/persistent_batch.py) against rebuilding
every row from the requests' lists: requests arriving, growing a block at a time, being
preempted and coming back with other blocks, finishing, more requests alive than rows, and
steps that need more rows or columns than the table has."""
from __future__ import annotations

import random

import torch

from kvflow.core.block_pool import NULL_BLOCK
from kvflow.outputs import ScheduledRequest
from kvflow.sampling_params import SamplingParams
from kvflow.worker.persistent_batch import PersistentBlockTables


class Live:
    def __init__(self, req_id: str, blocks: list[int]) -> None:
        self.req_id, self.blocks, self.preemptions = req_id, blocks, 0

    def scheduled(self) -> ScheduledRequest:
        # the scheduler hands the request's own list over, which grows in place
        return ScheduledRequest(self.req_id, [1], 0, self.blocks, True, SamplingParams(), [1],
                                [], frozenset(), num_preemptions=self.preemptions)


def check(tables: PersistentBlockTables, batch: list[Live], rows: list[int]) -> None:
    assert len(set(rows)) == len(rows), "two requests share a row"
    for live, row in zip(batch, rows):
        assert tables.table[row, :len(live.blocks)].tolist() == live.blocks


def test_rows_follow_every_change_of_the_requests():
    rng = random.Random(0)
    tables = PersistentBlockTables(max_blocks_per_seq=40, device=torch.device("cpu"), rows=8)
    alive: list[Live] = []
    next_id = 0
    writes = 0
    for _ in range(300):
        if len(alive) < 12 and rng.random() < 0.3:
            alive.append(Live(f"r{next_id}", rng.sample(range(1, 500), rng.randint(1, 5))))
            next_id += 1
        for live in alive:
            event = rng.random()
            if event < 0.2 and len(live.blocks) < 40:
                live.blocks.append(rng.randint(1, 500))  # in place, as the KV manager does
            elif event < 0.25:
                live.preemptions += 1  # back with other blocks, maybe fewer
                live.blocks[:] = rng.sample(range(1, 500), rng.randint(1, 6))
        finished = {live.req_id for live in alive if rng.random() < 0.05}
        alive = [live for live in alive if live.req_id not in finished]
        tables.forget(finished)
        batch = rng.sample(alive, min(len(alive), rng.randint(1, 8)))
        before = tables._host.clone()
        rows = tables.update([live.scheduled() for live in batch])
        writes += int((tables._host != before).sum())
        check(tables, batch, rows)
    # changes are written, not whole rows every step
    assert writes < sum(len(live.blocks) for live in alive) * 300 / 4


def test_a_growing_request_writes_only_its_new_block():
    tables = PersistentBlockTables(max_blocks_per_seq=8, device=torch.device("cpu"), rows=2)
    live = Live("a", [5, 6])
    (row,) = tables.update([live.scheduled()])
    tables._host[row, :2] = -7  # were the old blocks written again, they would reappear
    live.blocks.append(9)
    assert tables.update([live.scheduled()]) == [row]
    assert tables._host[row, :3].tolist() == [-7, -7, 9]
    live.preemptions += 1
    tables.update([live.scheduled()])
    assert tables.table[row, :3].tolist() == [5, 6, 9]


def test_a_step_needing_more_rows_or_columns_grows_the_table_keeping_the_rows_held():
    tables = PersistentBlockTables(max_blocks_per_seq=4, device=torch.device("cpu"), rows=2)
    first = [Live("a", [1, 2]), Live("b", [3])]
    rows = tables.update([live.scheduled() for live in first])
    # five requests at once, one of them longer than a row
    batch = first + [Live("c", [4]), Live("d", list(range(10, 19))), Live("e", [5, 6])]
    grown = tables.update([live.scheduled() for live in batch])
    assert grown[:2] == rows  # the rows held stay where they were
    assert tables.table.shape[0] >= 5 and tables.table.shape[1] >= 9
    check(tables, batch, grown)
    gathered = tables.gather(grown, 9)
    expected = [live.blocks + [NULL_BLOCK] * (9 - len(live.blocks)) for live in batch]
    assert gathered.tolist() == expected
    assert gathered.is_contiguous()
