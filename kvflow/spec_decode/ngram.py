"""Prompt lookup: propose what followed the last occurrence of the request's own latest
n tokens (n from prompt_lookup_max down to prompt_lookup_min) in its prompt and output.
No model, and nearly free, so it pays whenever text repeats (code, extraction, edits)."""
from __future__ import annotations

import numpy as np

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
    max_n tokens) that occurs earlier; [] if none does.

    Only the earlier occurrences of the last token can end a match, so the search starts
    from them and extends each backwards, rather than sliding every window length over the
    whole history (a step's proposal took 70 us over 300 tokens that way)."""
    if len(tokens) < 2:
        return []
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # each can end a match; none ends last
    longest = min(max_n, len(tokens) - 1)
    best, length = None, 1
    while ends.size and length <= longest:
        if length >= min_n:
            best = ends[-1]
        if length == longest:
            break
        # Extend every surviving match one token further back.
        ends = ends[ends >= length]
        ends = ends[tokens[ends - length] == tokens[-1 - length]]
        length += 1
    if best is None:
        return []
    return tokens[best + 1:best + 1 + k].tolist()
