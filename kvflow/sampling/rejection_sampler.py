"""Verifying draft tokens: exact rejection sampling (Leviathan et al. 2022, Chen et al. 2023).

A request proposes drafts x_1..x_k, drawn from the proposer's distributions q_1..q_k;
one forward pass gives the target's distributions p_1..p_{k+1} at the k+1 positions.
Draft x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)), in order, until the
first rejection; at a rejected position the token is drawn from norm(max(0, p_j - q_j)),
and when every draft is accepted a bonus token is drawn from p_{k+1}. Each emitted token
is then distributed exactly as the target alone would have sampled it. A proposer that
picks its tokens deterministically (prompt lookup, a greedy draft model) has a one-hot
q, so the rule becomes: accept with probability p_j(x_j), and on rejection draw from p_j
without x_j.

The p's are the sampler's own (logit_bias, bans, penalties, temperature, top-k, top-p,
min-p), taken at each position with the drafts before it counted as output. A greedy
request's p is one-hot at the argmax, so it accepts exactly the drafts that match it.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from kvflow.outputs import TokenLogprobs
from kvflow.sampling.sampler import Sampler, SamplingBatch, argmax, token_logprobs


def rejection_sample(target_probs: torch.Tensor, draft_token_ids: torch.Tensor,
                     num_drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                     uniforms: torch.Tensor, noise: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """target_probs [R, K+1, V]; draft_token_ids [R, K] (anything past num_drafts [R] is
    ignored); draft_probs [R, K, V], or None for one-hot proposals; uniforms [R, K] in
    [0, 1); noise [R, V] Exp(1). -> (drafts accepted [R], the token after them [R])."""
    num_requests, width, vocab = target_probs.shape
    rows = torch.arange(num_requests, device=target_probs.device)
    if width == 1:
        return (torch.zeros(num_requests, dtype=torch.int64, device=target_probs.device),
                argmax(target_probs[:, 0] / noise))
    drafts = draft_token_ids[:, None] if draft_token_ids.dim() == 1 else draft_token_ids
    p_draft = target_probs[:, :-1].gather(-1, drafts[..., None])[..., 0]  # [R, K]
    q_draft = (torch.ones_like(p_draft) if draft_probs is None
               else draft_probs.gather(-1, drafts[..., None])[..., 0])
    # u < p/q, written without the division so that q = 0 cannot divide.
    accepted = uniforms * q_draft < p_draft
    accepted &= torch.arange(width - 1, device=accepted.device) < num_drafts[:, None]
    num_accepted = accepted.int().cumprod(dim=-1).sum(dim=-1).long()
    p_next = target_probs[rows, num_accepted]  # [R, V]
    at = num_accepted.clamp(max=width - 2)
    if draft_probs is None:
        q_next = torch.zeros_like(p_next).scatter_(-1, drafts[rows, at][:, None], 1.0)
    else:
        q_next = draft_probs[rows, at]
    residual = (p_next - q_next).clamp_min(0)
    # The exponential race needs no normalisation. A residual with no mass arises only from
    # rounding (a rejection needs p(x) < q(x), so p - q is positive somewhere).
    rejected = (num_accepted < num_drafts) & (residual.sum(dim=-1) > 0)
    dist = torch.where(rejected[:, None], residual, p_next)
    return num_accepted, argmax(dist / noise)


class RejectionSampler:
    """Samples a batch in which some requests verify drafts: every request gets the drafts
    it accepted plus one token. Rows are laid out as sampler.sampling_rows lays them out:
    each request's k+1 rows in order, requests one after another."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, drafts: list[list[int]],
                 draft_probs: list[torch.Tensor | None] | None = None
                 ) -> tuple[list[list[int]], list[list[TokenLogprobs] | None]]:
        """logits [rows, V]; draft_probs: per request, [its drafts, V] the distributions its
        drafts were drawn from, or None for one-hot proposals -> (tokens per request, their
        logprobs per request or None)."""
        device = logits.device
        counts = [len(d) for d in drafts]
        firsts_list = list(itertools.accumulate((c + 1 for c in counts[:-1]), initial=0))
        firsts = torch.tensor(firsts_list, dtype=torch.int64, device=device)
        num_drafts = torch.tensor(counts, dtype=torch.int64, device=device)
        width = max(counts) + 1
        # [R, K+1] rows of each request; past its drafts, its last row again (ignored).
        index = firsts[:, None] + torch.minimum(torch.arange(width, device=device),
                                                num_drafts[:, None])
        draft_ids = torch.tensor([d + [0] * (width - 1 - len(d)) for d in drafts],
                                 dtype=torch.int64, device=device).view(len(drafts), width - 1)
        wants_logprobs = any(n is not None for n in batch.num_logprobs)
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if wants_logprobs else None
        adjusted = self.sampler.adjust(logits.float(), batch) if batch.adjusts_logits else logits
        if batch.all_greedy or batch.noise_keys is not None:
            # Each position's token is the one sampling would take there, its noise seeded by
            # the position (batch-invariant mode; a greedy row's is its argmax), and a draft
            # is accepted where it is that token: exact, whatever the drafts' distribution.
            target = self.sampler.choose(adjusted.float(), batch)[index]  # [R, K+1]
            matches = (target[:, :-1] == draft_ids) & (
                torch.arange(width - 1, device=device) < num_drafts[:, None])
            num_accepted = matches.int().cumprod(dim=-1).sum(dim=-1).long()
            final = target.gather(1, num_accepted[:, None])[:, 0]
        else:
            probs = self.sampler.tempered_probs(adjusted.float(), batch)
            if batch.any_greedy:
                greedy = batch.temperature == 0
                one_hot = torch.zeros_like(probs).scatter_(-1, argmax(adjusted)[:, None], 1.0)
                probs = torch.where(greedy[:, None], one_hot, probs)
            request_batch = _per_request(batch, firsts_list)
            num_accepted, final = rejection_sample(
                probs[index], draft_ids, num_drafts,
                _dense_draft_probs(draft_probs, draft_ids, probs.shape[-1]),
                self.sampler.uniform_noise(draft_ids.shape, request_batch),
                self.sampler.exponential_noise(torch.Size((len(drafts), probs.shape[-1])),
                                               request_batch))
        accepted_list, final_list = num_accepted.tolist(), final.tolist()
        tokens = [d[:a] + [t] for d, a, t in zip(drafts, accepted_list, final_list)]
        if raw_logprobs is None:
            return tokens, [None] * len(drafts)
        return tokens, self._logprobs(raw_logprobs, batch, firsts_list, tokens)

    @staticmethod
    def _logprobs(raw_logprobs: torch.Tensor, batch: SamplingBatch, firsts: list[int],
                  tokens: list[list[int]]) -> list[list[TokenLogprobs] | None]:
        rows = [first + i for first, emitted in zip(firsts, tokens) for i in range(len(emitted))]
        chosen = torch.tensor([t for emitted in tokens for t in emitted],
                              device=raw_logprobs.device)
        entries = token_logprobs(raw_logprobs[rows], chosen,
                                 [batch.num_logprobs[row] for row in rows])
        result: list[list[TokenLogprobs] | None] = []
        start = 0
        for first, emitted in zip(firsts, tokens):
            mine = entries[start:start + len(emitted)]
            start += len(emitted)
            result.append(None if batch.num_logprobs[first] is None else mine)  # type: ignore
        return result


def _dense_draft_probs(draft_probs: list[torch.Tensor | None] | None, draft_ids: torch.Tensor,
                       vocab: int) -> torch.Tensor | None:
    """[R, K, V]: each request's proposal distributions (each [its drafts, V]), one-hot
    where it proposed deterministically (rows past a request's drafts are never read);
    None when every request proposed deterministically."""
    if draft_probs is None or all(p is None for p in draft_probs):
        return None
    dense = torch.zeros((*draft_ids.shape, vocab), device=draft_ids.device)
    dense.scatter_(-1, draft_ids[..., None], 1.0)
    for row, probs in enumerate(draft_probs):
        if probs is not None:
            dense[row, :len(probs)] = probs
    return dense


def _per_request(batch: SamplingBatch, firsts: list[int]) -> SamplingBatch:
    """The batch's generators keyed by request instead of by row, for the draws a request
    makes once (its uniforms and its final token's noise)."""
    return replace(batch, generators={request: batch.generators[row]
                                      for request, row in enumerate(firsts)
                                      if row in batch.generators})
