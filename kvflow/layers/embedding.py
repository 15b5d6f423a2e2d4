"""The token embedding split by vocabulary rows across tensor-parallel ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.distributed.tensor_parallel import COLUMN, current, rows_part


class VocabParallelEmbedding(nn.Embedding):
    """Each rank holds a contiguous slice of the rows (the last padded) and looks up the
    ids in it; the others' rows are zero, and the sum over ranks is the embedding. As the
    tied LM head, each rank's slice gives its slice of the logits."""

    tp_split = COLUMN

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        self.tp = current()
        self.first, rows = self.tp.rows_of(vocab_size)
        super().__init__(rows, hidden_size, _weight=torch.empty(rows, hidden_size))

    def rank_part(self, tensor: torch.Tensor, shard: str | None, param: str) -> torch.Tensor:
        return rows_part(tensor, self.tp, {"": (self.num_embeddings, 1)}, shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))
