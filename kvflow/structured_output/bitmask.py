"""Next-token bitmasks: filled by the grammars of constrained rows, applied to their logits.

A bitmask row holds one bit per vocabulary entry, 32 to an int32 (bit i of word w allows
token 32 * w + i), as llguidance and xgrammar write them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance
import torch

from kvflow.structured_output.matcher import RequestGrammar

if TYPE_CHECKING:
    from kvflow.outputs import ScheduledRequest


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarMasker:
    """Fills the masks of a step's constrained sequences in one call: llguidance spreads them
    over its own threads with the GIL released."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._executor = llguidance.LLExecutor()

    def for_step(self, requests: Sequence[ScheduledRequest], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows [N] int64 on `device`, bitmask [N, width]) for the constrained requests
        among a step's sampling requests, whose rows are laid out as the sampler lays them:
        1 + len(draft_token_ids) per request, in order. None when none is constrained."""
        rows: list[int] = []
        grammars, drafts = [], []
        first = 0
        for request in requests:
            num_rows = 1 + len(request.draft_token_ids)
            if request.grammar is not None:
                rows.extend(range(first, first + num_rows))
                grammars.append(request.grammar)
                drafts.append(request.draft_token_ids)
            first += num_rows
        if not grammars:
            return None
        return torch.tensor(rows, dtype=torch.int64, device=device), self.fill(grammars, drafts)

    def fill(self, grammars: Sequence[RequestGrammar],
             draft_token_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """[rows, width] int32 on the CPU: per grammar, the mask at its current position,
        then one after each of its draft tokens (1 + len(drafts) rows each, in order). Rows
        past a draft token the grammar refuses allow everything: the refused token is
        rejected at its own position, so they are never sampled from."""
        drafts = draft_token_ids or [()] * len(grammars)
        firsts, num_rows = [], 0
        for tokens in drafts:
            firsts.append(num_rows)
            num_rows += 1 + len(tokens)
        width = bitmask_width(self.vocab_size)
        bitmask = torch.full((num_rows, width), -1, dtype=torch.int32)
        pointer, row_bytes = bitmask.data_ptr(), width * 4
        entries = list(zip(grammars, firsts, drafts))
        plain = [(g.matcher, first) for g, first, tokens in entries if not tokens]
        if plain:
            self._executor.unsafe_compute_mask_ptr(plain, pointer, row_bytes, num_rows)
        drafted = [(g.matcher, first, list(tokens)) for g, first, tokens in entries if tokens]
        if drafted:
            self._executor.unsafe_compute_mask_ptr_with_draft_token(drafted, pointer, row_bytes,
                                                                    num_rows)
        return bitmask


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the tokens each bitmask row [N, width] forbids set to -inf in its
    row of `rows` [N] (int64); other rows are left as they are. Out of place."""
    vocab_size = logits.shape[-1]
    bitmask = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = ((bitmask[:, :, None] >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab_size]
    # Adding log(bit), 0 or -inf, is exact and on the CPU a third of masked_fill's time
    # (32 rows x 8,192 in bf16: 0.24 against 0.72 ms).
    return logits.index_put((rows,), logits[rows] + bits.to(logits.dtype).log())
