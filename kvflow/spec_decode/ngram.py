"""Prompt lookup: propose what followed the last occurrence of the request's own latest
n tokens (n from prompt_lookup_max down to prompt_lookup_min) in its prompt and output.
No model, and nearly free, so it pays whenever text repeats (code, extraction, edits)."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kvflow.spec_decode.proposer import ProposalRequest, Proposals, Proposer


class NgramProposer(Proposer):
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int,
                 prompt_lookup_max: int) -> None:
        self.k = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, requests: list[ProposalRequest]) -> Proposals:
        drafts = {}
        for request in requests:
            found = propose_ngram(np.asarray(request.token_ids, dtype=np.int64), self.min_n,
                                  self.max_n, min(self.k, request.max_drafts))
            if found:
                drafts[request.req_id] = found
        return Proposals(token_ids=drafts)


def propose_ngram(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """The k tokens after the latest earlier occurrence of the longest suffix (of min_n to
    max_n tokens) that occurs earlier; [] if none does."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        # Windows that end before the last token, so that each has a continuation.
        windows = sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []
