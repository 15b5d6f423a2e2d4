"""What a proposer sees and returns, and the runner-side policy around it: which requests
propose at all (small enough batches, requests whose drafts keep being accepted)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from kvflow.outputs import ScheduledRequest
from kvflow.spec_decode.config import MIN_VERIFIED_DRAFTS, SpeculativeConfig


@dataclass
class ProposalRequest:
    """A request that sampled this step, as a proposer sees it."""

    req_id: str
    token_ids: list[int]  # prompt, output and the tokens this step added
    num_computed_tokens: int  # KV is in the cache for all tokens but the last
    block_ids: list[int]  # the request's block table, lookahead slots included
    max_drafts: int  # proposals past this would leave the slots the request holds
    temperature: float  # 0: the request is greedy, so only the argmax can be accepted
    generator: torch.Generator  # the request's own when seeded, so that it repeats


@dataclass
class Proposals:
    """Draft tokens to verify at each request's next step (a request may get none)."""

    token_ids: dict[str, list[int]] = field(default_factory=dict)
    # [drafts, vocab]: the distribution each of a request's drafts was drawn from; a request
    # absent here chose its drafts deterministically, a one-hot proposal.
    probs: dict[str, torch.Tensor] = field(default_factory=dict)


class Proposer(ABC):
    @abstractmethod
    def propose(self, requests: list[ProposalRequest]) -> Proposals:
        """Drafts for the requests (a request may get none)."""

    def forget(self, req_ids: set[str]) -> None:
        """Drop per-request state kept beside the KV cache: the request finished, or was
        preempted and its blocks are gone."""


@dataclass
class _Acceptance:
    drafted: int = 0
    accepted: int = 0


class Speculator:
    """Runs a proposer after each step for the requests where speculation pays."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer, block_size: int) -> None:
        self.config = config
        self.proposer = proposer
        self.block_size = block_size
        self._acceptance: dict[str, _Acceptance] = {}

    def forget(self, finished_req_ids: set[str]) -> None:
        for req_id in finished_req_ids:
            self._acceptance.pop(req_id, None)
        self.proposer.forget(finished_req_ids)

    def drop_kv(self, preempted_req_ids: set[str]) -> None:
        self.proposer.forget(preempted_req_ids)

    def propose(self, requests: list[ScheduledRequest], sampled: dict[str, list[int]],
                batch_size: int, generators: dict[str, torch.Generator],
                default_generator: torch.Generator) -> Proposals:
        """requests: those that sampled this step, with sampled their new tokens;
        generators: the seeded requests' own."""
        for request in requests:
            if request.draft_token_ids:
                tally = self._acceptance.setdefault(request.req_id, _Acceptance())
                tally.drafted += len(request.draft_token_ids)
                tally.accepted += len(sampled[request.req_id]) - 1
        limit = self.config.disable_by_batch_size
        if limit is not None and batch_size > limit:
            return Proposals()
        proposing = []
        for request in requests:
            if not self._pays(request.req_id):
                continue
            new_tokens = sampled[request.req_id]
            num_tokens = (len(request.prompt_token_ids) + len(request.output_token_ids)
                          + len(new_tokens))
            # The proposer writes KV at the positions of all but its last draft.
            room = len(request.block_ids) * self.block_size - num_tokens + 1
            max_drafts = min(self.config.num_speculative_tokens, room)
            if max_drafts < 1:
                continue
            proposing.append(ProposalRequest(
                req_id=request.req_id,
                token_ids=request.prompt_token_ids + request.output_token_ids + new_tokens,
                num_computed_tokens=num_tokens - 1, block_ids=request.block_ids,
                max_drafts=max_drafts, temperature=request.sampling_params.temperature,
                generator=generators.get(request.req_id, default_generator)))
        return self.proposer.propose(proposing) if proposing else Proposals()

    def _pays(self, req_id: str) -> bool:
        tally = self._acceptance.get(req_id)
        return (tally is None or tally.drafted < MIN_VERIFIED_DRAFTS
                or tally.accepted >= self.config.min_acceptance_rate * tally.drafted)
