"""One sequence's place in its grammar."""
from __future__ import annotations

from collections.abc import Sequence

import llguidance


class RequestGrammar:
    """Advanced by every token its sequence accepts; rolled back when tokens are taken back
    (speculative positions). A preempted sequence keeps its matcher: it is recomputed from
    tokens the matcher has already accepted."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_ids: Sequence[int]) -> bool:
        """False if the grammar refuses a token; the matcher then stays in an error state."""
        return self.matcher.consume_tokens(list(token_ids))

    def rollback(self, num_tokens: int) -> None:
        if not self.matcher.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self.matcher.get_error()}")

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the grammar refused a token: the first line of llguidance's report (the rest
        is a dump of the parser's state)."""
        message = self.matcher.get_error()
        return message.splitlines()[0] if message else None
