"""The rejection sampler reproduces the target's distribution exactly.

Each check is a chi-square goodness-of-fit test of many verified samples against the
target distribution, at a false-alarm rate of 1e-4 per test for a correct sampler (the
seeds are fixed, so a run either passes or fails the same way every time). A sampler that
skips the correction (emits accepted drafts with the proposer's distribution, or
resamples from p instead of max(0, p - q)) fails them by orders of magnitude: see
test_the_test_catches_a_wrong_residual.
"""
from __future__ import annotations

import pytest
import torch

from kvflow.outputs import ScheduledRequest
from kvflow.sampling.rejection_sampler import RejectionSampler, rejection_sample
from kvflow.sampling.sampler import Sampler, prepare_sampling, sampling_rows
from kvflow.sampling_params import SamplingParams

FALSE_ALARM = 1e-4
N = 40_000


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= statistic) for X ~ chi2(df) over the cells the distribution can reach; a
    count in a cell of probability 0 is an outright failure (p-value 0)."""
    counts, probs = counts.double(), probs.double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    live = probs > 0
    expected = probs[live] * counts.sum()
    statistic = ((counts[live] - expected) ** 2 / expected).sum()
    df = int(live.sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         statistic / 2))


def _dist(*values: float) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    return t / t.sum()


# Hostile (p, q) pairs over a 6-token vocabulary.
PAIRS = {
    "p equals q": (_dist(1, 2, 3, 4, 5, 6), _dist(1, 2, 3, 4, 5, 6)),
    "disjoint supports": (_dist(1, 2, 3, 0, 0, 0), _dist(0, 0, 0, 3, 2, 1)),
    "one-hot q": (_dist(5, 1, 1, 1, 1, 1), _dist(0, 0, 1, 0, 0, 0)),
    "q zero where p is not": (_dist(1, 1, 1, 1, 1, 1), _dist(0, 4, 4, 1, 0, 0)),
    "random": (torch.softmax(torch.randn(6, generator=torch.Generator().manual_seed(1)), 0),
               torch.softmax(torch.randn(6, generator=torch.Generator().manual_seed(2)), 0)),
}


def _first_tokens(p: torch.Tensor, q: torch.Tensor, seed: int,
                  residual_bug: bool = False) -> torch.Tensor:
    """N verifications of one draft drawn from q against p: the first emitted token each."""
    generator = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q, N, replacement=True, generator=generator)[:, None]
    target = p.expand(N, 2, -1).clone()
    uniforms = torch.rand(N, 1, generator=generator)
    noise = torch.empty(N, p.numel()).exponential_(generator=generator)
    draft_probs = q.expand(N, 1, -1)
    if residual_bug:
        draft_probs = torch.zeros_like(draft_probs)  # resample from p, not max(0, p - q)
    accepted, final = rejection_sample(target, drafts, torch.ones(N, dtype=torch.int64),
                                       draft_probs, uniforms, noise)
    return torch.where(accepted > 0, drafts[:, 0], final)


@pytest.mark.parametrize("name", PAIRS)
def test_first_token_follows_the_target(name):
    p, q = PAIRS[name]
    tokens = _first_tokens(p, q, seed=3)
    counts = torch.bincount(tokens, minlength=p.numel())
    assert chi_square_p_value(counts, p) > FALSE_ALARM, (name, counts.tolist())


def test_the_test_catches_a_wrong_residual():
    p, q = PAIRS["random"]
    counts = torch.bincount(_first_tokens(p, q, seed=3, residual_bug=True), minlength=6)
    assert chi_square_p_value(counts, p) < 1e-12


def test_one_hot_proposals_need_no_draft_probs():
    """draft_probs=None (prompt lookup, a greedy draft) means q is one-hot at the draft."""
    p = PAIRS["random"][0]
    draft = 2
    generator = torch.Generator().manual_seed(5)
    accepted, final = rejection_sample(
        p.expand(N, 2, -1).clone(), torch.full((N, 1), draft), torch.ones(N, dtype=torch.int64),
        None, torch.rand(N, 1, generator=generator),
        torch.empty(N, 6).exponential_(generator=generator))
    tokens = torch.where(accepted > 0, draft, final)
    assert chi_square_p_value(torch.bincount(tokens, minlength=6), p) > FALSE_ALARM
    # Accepted about p(draft) of the time; a rejection never emits the draft itself.
    assert abs(accepted.float().mean() - p[draft]) < 0.01
    assert not (final[accepted == 0] == draft).any()


def test_joint_distribution_of_two_tokens():
    """Targets that depend on the previous token: the first two tokens of a stream verified
    two drafts at a time follow p1(a) * p2(b | a), as plain sampling would."""
    vocab = 4
    generator = torch.Generator().manual_seed(11)
    p1 = torch.softmax(torch.randn(vocab, generator=generator), 0)
    p2 = torch.softmax(2 * torch.randn(vocab, vocab, generator=generator), -1)  # [prev, next]
    q1 = torch.softmax(torch.randn(vocab, generator=generator), 0)
    q2 = torch.softmax(torch.randn(vocab, vocab, generator=generator), -1)

    x1 = torch.multinomial(q1, N, replacement=True, generator=generator)
    x2 = torch.multinomial(q2[x1], 1, generator=generator)[:, 0]
    target = torch.stack([p1.expand(N, -1), p2[x1], p1.expand(N, -1)], dim=1)  # 3rd unused
    accepted, final = rejection_sample(
        target, torch.stack([x1, x2], 1), torch.full((N,), 2), torch.stack(
            [q1.expand(N, -1), q2[x1]], 1), torch.rand(N, 2, generator=generator),
        torch.empty(N, vocab).exponential_(generator=generator))
    first = torch.where(accepted > 0, x1, final)
    second = torch.where(accepted > 1, x2, final)
    # Rejected at the first draft: the second token comes from the next step, which
    # verifies a new draft from q2 against p2 after the emitted first token.
    again = accepted == 0
    n_again = int(again.sum())
    y = torch.multinomial(q2[first[again]], 1, generator=generator)[:, 0]
    got, nxt = rejection_sample(
        torch.stack([p2[first[again]], p2[first[again]]], 1), y[:, None],
        torch.ones(n_again, dtype=torch.int64), q2[first[again]][:, None],
        torch.rand(n_again, 1, generator=generator),
        torch.empty(n_again, vocab).exponential_(generator=generator))
    second[again] = torch.where(got > 0, y, nxt)
    counts = torch.bincount(first * vocab + second, minlength=vocab * vocab)
    expected = (p1[:, None] * p2).flatten()
    assert chi_square_p_value(counts, expected) > FALSE_ALARM


def _request(i: int, params: SamplingParams, drafts: list[int]) -> ScheduledRequest:
    return ScheduledRequest(req_id=f"r{i}", token_ids=[1], num_computed_tokens=3,
                            block_ids=[1], sample=True, sampling_params=params,
                            prompt_token_ids=[1, 2, 3], output_token_ids=[],
                            stop_token_ids=frozenset(), draft_token_ids=drafts)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.1, top_k=6),
], ids=["temperature", "top_k", "top_p", "min_p"])
def test_verified_tokens_follow_the_processed_target(params):
    """Through the sampler's own processing: one draft (a one-hot proposal, as prompt
    lookup makes) per request; the first emitted token follows what the plain sampler
    samples from."""
    vocab, requests = 8, 6000
    logits_row = torch.randn(vocab, generator=torch.Generator().manual_seed(7)) * 2
    batch_requests = [_request(i, params, [3]) for i in range(requests)]
    rows = [row for r in batch_requests for row in sampling_rows(r)]
    batch = prepare_sampling(rows, {}, vocab, torch.device("cpu"))
    logits = logits_row.expand(len(rows), -1).clone()
    sampler = Sampler(torch.Generator().manual_seed(13))
    tokens, _ = RejectionSampler(sampler)(logits, batch, [r.draft_token_ids
                                                          for r in batch_requests])
    first = torch.tensor([t[0] for t in tokens])
    expected = Sampler.tempered_probs(logits[:1], prepare_sampling(rows[:1], {}, vocab,
                                                                    torch.device("cpu")))[0]
    assert chi_square_p_value(torch.bincount(first, minlength=vocab), expected) > FALSE_ALARM


def test_greedy_accepts_exactly_the_argmax_matches():
    vocab = 10
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(3))
    argmax = logits.argmax(-1).tolist()
    greedy = SamplingParams(temperature=0)
    # Request 0: three drafts, the first two match. Request 1: no drafts. Request 2: three
    # drafts, all match (the bonus token follows).
    drafts = [[argmax[0], argmax[1], (argmax[2] + 1) % vocab], [],
              [argmax[5], argmax[6], argmax[7]]]
    requests = [_request(i, greedy, d) for i, d in enumerate(drafts)]
    rows = [row for r in requests for row in sampling_rows(r)]
    batch = prepare_sampling(rows, {}, vocab, torch.device("cpu"))
    tokens, _ = RejectionSampler(Sampler(torch.Generator()))(logits, batch, drafts)
    assert tokens == [argmax[0:3], [argmax[4]], argmax[5:9]]


def test_seeded_requests_repeat_their_tokens():
    vocab = 12
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=1.0, seed=42)

    def run() -> list[list[int]]:
        requests = [_request(0, params, [1, 2, 3])]
        rows = sampling_rows(requests[0])
        generators = {"r0": torch.Generator().manual_seed(42)}
        batch = prepare_sampling(rows, generators, vocab, torch.device("cpu"))
        # The engine's own generator differs between the runs: a seeded request must not
        # depend on it.
        sampler = Sampler(torch.Generator().manual_seed(torch.seed() % 2**31))
        return RejectionSampler(sampler)(logits, batch, [[1, 2, 3]])[0]

    assert all(run() == run() for _ in range(5))


def test_sampled_and_one_hot_proposals_in_one_batch():
    """The draft model's sampled drafts come with their distribution q, beside requests
    whose drafts are one-hot (greedy draft, prompt lookup): both halves follow the target,
    and the sampled drafts are accepted at the rate sum(min(p, q)) that q buys. (Verified
    as if one-hot they would still follow the target, but be accepted only sum(p * q) of
    the time.)"""
    vocab, requests = 8, 8000
    half = requests // 2
    params = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(21)
    logits_row = torch.randn(vocab, generator=generator)
    q = torch.softmax(torch.randn(vocab, generator=generator) * 0.5, 0)
    sampled = torch.multinomial(q, half, replacement=True, generator=generator)
    drafts = [[int(t)] for t in sampled] + [[3]] * half
    batch_requests = [_request(i, params, d) for i, d in enumerate(drafts)]
    rows = [row for r in batch_requests for row in sampling_rows(r)]
    batch = prepare_sampling(rows, {}, vocab, torch.device("cpu"))
    logits = logits_row.expand(len(rows), -1).clone()
    p = torch.softmax(logits_row, 0)

    def verify(draft_probs: list) -> tuple[torch.Tensor, torch.Tensor, float]:
        sampler = Sampler(torch.Generator().manual_seed(13))
        tokens, _ = RejectionSampler(sampler)(logits, batch, drafts, draft_probs)
        first = torch.tensor([t[0] for t in tokens])
        accepted = sum(len(t) - 1 for t in tokens[:half]) / half
        return (torch.bincount(first[:half], minlength=vocab),
                torch.bincount(first[half:], minlength=vocab), accepted)

    with_q, one_hot, accepted = verify([q[None]] * half + [None] * half)
    assert chi_square_p_value(with_q, p) > FALSE_ALARM
    assert chi_square_p_value(one_hot, p) > FALSE_ALARM
    assert abs(accepted - torch.minimum(p, q).sum().item()) < 0.025
    _, _, accepted_as_one_hot = verify([None] * requests)
    assert abs(accepted_as_one_hot - (p * q).sum().item()) < 0.025
    assert torch.minimum(p, q).sum() - (p * q).sum() > 0.3


@pytest.mark.parametrize("seed", range(6))
def test_position_keyed_noise_makes_verification_take_the_sampled_tokens(seed):
    """Batch-invariant mode: with each row's noise seeded by its request and position, a
    verification emits exactly the tokens sampling them one at a time would, whichever
    drafts it is given (accepted up to the first that differs)."""
    vocab = 12
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    prompt, output = [1, 2, 3], [4]
    logits = torch.randn(4, vocab, generator=generator)  # positions 4..7
    keys = {"r": 1000 + seed}
    sampler = Sampler(torch.Generator().manual_seed(0))

    def sampled_alone(position: int, before: list[int]) -> int:
        request = ScheduledRequest(req_id="r", token_ids=[0], num_computed_tokens=0,
                                   block_ids=[0], sample=True, sampling_params=params,
                                   prompt_token_ids=prompt, output_token_ids=output + before,
                                   stop_token_ids=frozenset())
        batch = prepare_sampling([request], {}, vocab, torch.device("cpu"), keys)
        return sampler(logits[position:position + 1], batch)[0].item()

    expected: list[int] = []
    for position in range(4):
        expected.append(sampled_alone(position, expected))
    for drafts in (expected[:3], expected[:1] + [(expected[1] + 1) % vocab] + expected[2:3],
                   [(expected[0] + 1) % vocab] * 3):
        request = ScheduledRequest(req_id="r", token_ids=[0], num_computed_tokens=0,
                                   block_ids=[0], sample=True, sampling_params=params,
                                   prompt_token_ids=prompt, output_token_ids=output,
                                   stop_token_ids=frozenset(), draft_token_ids=drafts)
        batch = prepare_sampling(sampling_rows(request), {}, vocab, torch.device("cpu"), keys)
        (tokens,), _ = RejectionSampler(sampler)(logits, batch, [drafts])
        accepted = next((i for i, d in enumerate(drafts) if d != expected[i]), len(drafts))
        assert tokens == expected[:accepted + 1]
