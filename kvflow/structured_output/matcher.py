"""One sequence's place in its grammar."""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import llguidance

if TYPE_CHECKING:
    from kvflow.structured_output.bitmask import MaskJob


class RequestGrammar:
    """Advanced by every token its sequence accepts; rolled back when tokens are taken back
    (speculative positions). A preempted sequence keeps its matcher: it is recomputed from
    tokens the matcher has already accepted.

    Its masks are computed on the masker's threads (`mask_job`), never while the engine
    thread advances it: a sequence samples, and so accepts, only once its job is done."""

    def __init__(self, matcher: llguidance.LLMatcher, group: Hashable = None) -> None:
        self.matcher = matcher
        self.group = group  # the sequences of one compiled constraint share mask threads
        self.position = 0  # tokens accepted
        self.mask_job: MaskJob | None = None

    def accept(self, token_ids: Sequence[int]) -> bool:
        """False if the grammar refuses a token; the matcher then stays in an error state."""
        accepted = self.matcher.consume_tokens(list(token_ids))
        if accepted:
            self.position += len(token_ids)
        return accepted

    def rollback(self, num_tokens: int) -> None:
        if not self.matcher.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self.matcher.get_error()}")
        self.position -= num_tokens

    def fill_masks(self, pointer: int, row_bytes: int, draft_token_ids: Sequence[int]) -> None:
        """Writes the mask at the current position at `pointer`, then one row after each
        draft token the grammar takes, and leaves the matcher where it was. Rows after a
        draft it refuses, or after it completes, are not written. Drops the GIL, and runs
        on the calling thread (llguidance's executor would run every sequence's masks on
        one shared pool, where a slow grammar holds the others back)."""
        self.matcher.unsafe_compute_mask_ptr(pointer, row_bytes)
        taken = 0
        for token_id in draft_token_ids:
            if self.matcher.is_stopped() or self.matcher.try_consume_tokens([token_id]) != 1:
                break
            taken += 1
            self.matcher.unsafe_compute_mask_ptr(pointer + taken * row_bytes, row_bytes)
        if taken:
            self.matcher.rollback(taken)

    @property
    def awaiting_mask(self) -> bool:
        """Its next mask is being computed, and still within its time: the scheduler lets
        the sequence wait rather than compute its last token again."""
        return self.mask_job is not None and self.mask_job.running

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the grammar refused a token or gave up (a limit of llguidance's): the first
        line of its report (the rest is a dump of the parser's state)."""
        message = self.matcher.get_error()
        return message.splitlines()[0] if message else None
