"""Batched sampling on tensors.

Order of operations, as in vLLM: logprobs are taken from the model's raw logits; then
logit_bias, the min_tokens mask over stop tokens, repetition/presence/frequency
penalties, temperature, top-k, top-p and min-p. A sample is the argmax of
probs / Exp(1) noise (the exponential race, equivalent to multinomial sampling). Rows
with a seed draw their noise from their own generator, so their tokens do not depend
on what else is in the batch. In batch-invariant mode a row's noise is seeded by its request
and the position it samples at, so a sample does not depend on how many draws came before
it either: speculative verification then takes exactly the tokens sampling would.

A row is one position to sample at. A request verifying draft tokens (speculative
decoding) has a row at its last known token and one at each draft, and each row sees
the drafts before it as output, so that penalties, min_tokens and bad words act there as
they would had those tokens been sampled one step at a time.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from kvflow.host_copy import tensor_on, to_device
from kvflow.outputs import ScheduledRequest, TokenLogprobs
from kvflow.sampling_params import SamplingParams
from kvflow.structured_output.bitmask import apply_token_bitmask


@dataclass
class SamplingRow:
    """One position to sample at: its request's parameters and the output before it."""

    req_id: str
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_token_ids: frozenset[int]


def sampling_rows(request: ScheduledRequest) -> list[SamplingRow]:
    """The rows of a request that samples: its last known token, then each draft token."""
    output = request.output_token_ids
    return [SamplingRow(request.req_id, request.sampling_params, request.prompt_token_ids,
                        output + request.draft_token_ids[:i] if i else output,
                        request.stop_token_ids)
            for i in range(len(request.draft_token_ids) + 1)]


@dataclass
class Penalties:
    repetition: torch.Tensor  # [B] float32
    presence: torch.Tensor  # [B] float32
    frequency: torch.Tensor  # [B] float32
    seen: torch.Tensor  # [B, V] bool: token in the prompt or the output
    output_counts: torch.Tensor  # [B, V] float32


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] float32, 0 for greedy rows
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int64, vocab size where disabled
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    generators: dict[int, torch.Generator]  # row -> the request's own generator
    penalties: Penalties | None
    # (rows, token ids, values) to add to the logits
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) set to -inf
    allowed: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids): all else -inf
    num_logprobs: list[int | None]  # per row
    # (rows [N] int64, bitmask [N, ceil(V/32)] int32): what each constrained row's grammar
    # allows (structured output); set by the runner, which keeps the grammars' masker
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None
    # [B] per row, the seed of its noise, from its request's and its position's: set in
    # batch-invariant mode, where a sample depends on nothing but its request and position
    noise_keys: list[int] | None = None
    # some row is greedy: known on the host, so that no step asks the device
    any_greedy: bool = True

    @property
    def adjusts_logits(self) -> bool:
        return (self.logit_bias is not None or self.banned is not None
                or self.allowed is not None or self.penalties is not None
                or self.grammar is not None)

    @property
    def only_masks_logits(self) -> bool:
        """The adjustments only forbid tokens (-inf), which is exact in any dtype; biases
        and penalties do arithmetic, which is done in float32."""
        return self.logit_bias is None and self.penalties is None


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64,
                        device=device).view(len(rows), width)


def _presence(rows: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32 counts of each token in each row (one extra column absorbs padding)."""
    ids = _padded(rows, vocab_size, device)
    counts = torch.zeros(len(rows), vocab_size + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


@functools.lru_cache(maxsize=1024)
def _id_tensor(ids: frozenset[int]) -> torch.Tensor:
    """A stop-id set as a tensor, once per distinct set (a request's samples share theirs)."""
    return torch.tensor(sorted(ids), dtype=torch.int64)


def _bad_word_ends(words: list[list[int]], output: list[int]) -> torch.Tensor:
    """The tokens that would complete a bad word now: a one-token word always, a longer
    one when the output ends with all of it but its last token (vLLM's rule)."""
    ends = {word[-1] for word in words
            if len(word) == 1 or output[len(output) - len(word) + 1:] == word[:-1]}
    return torch.tensor(sorted(ends), dtype=torch.int64)


def _rows_of(entries: list[tuple[int, tuple[torch.Tensor, ...]]],
             device: torch.device) -> torch.Tensor:
    """The batch row of every id in entries [(row, (ids, ...))], in order."""
    rows = torch.tensor([row for row, _ in entries], dtype=torch.int64)
    counts = torch.tensor([len(tensors[0]) for _, tensors in entries], dtype=torch.int64)
    return to_device(torch.repeat_interleave(rows, counts), device)


def noise_key(request_key: int, position: int) -> int:
    """The seed of the noise a request samples its token at `position` with."""
    return (request_key * 0x9E3779B97F4A7C15 + position) % 2**63


def prepare_sampling(requests: list[SamplingRow] | list[ScheduledRequest],
                     generators: dict[str, torch.Generator], vocab_size: int,
                     device: torch.device,
                     noise_keys: dict[str, int] | None = None) -> SamplingBatch:
    """noise_keys (batch-invariant mode): each request's key, from which every row's noise
    is seeded by the position it samples at, instead of drawn from generators in turn."""
    params = [r.sampling_params for r in requests]

    def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return tensor_on(values, device, dtype)

    penalties = None
    if any(p.uses_penalties for p in params):
        output_counts = _presence([r.output_token_ids for r in requests], vocab_size, device)
        prompt_counts = _presence([r.prompt_token_ids for r in requests], vocab_size, device)
        penalties = Penalties(
            repetition=column([p.repetition_penalty for p in params]),
            presence=column([p.presence_penalty for p in params]),
            frequency=column([p.frequency_penalty for p in params]),
            seen=(output_counts > 0) | (prompt_counts > 0),
            output_counts=output_counts,
        )
    # Per row, not per entry: each request's ids are tensors built once, so a request with
    # a long logit_bias or many stop ids costs the step a copy, not a Python loop.
    biased = [(row, p.logit_bias_tensors) for row, p in enumerate(params) if p.logit_bias]
    logit_bias = banned = None
    if biased:
        ids = torch.cat([tensors[0] for _, tensors in biased])
        logit_bias = (_rows_of(biased, device), to_device(ids, device),
                      to_device(torch.cat([tensors[1] for _, tensors in biased]), device))
    bans = [(row, _id_tensor(r.stop_token_ids)) for row, r in enumerate(requests)
            if len(r.output_token_ids) < r.sampling_params.min_tokens and r.stop_token_ids]
    bans += [(row, ids) for row, r in enumerate(requests)
             if r.sampling_params.bad_words_token_ids
             and len(ids := _bad_word_ends(r.sampling_params.bad_words_token_ids,
                                           r.output_token_ids))]
    allowed_rows = [(row, (p.allowed_token_tensor,)) for row, p in enumerate(params)
                    if p.allowed_token_ids is not None]
    allowed = None
    if allowed_rows:
        allowed = (_rows_of(allowed_rows, device),
                   to_device(torch.cat([ids for _, (ids,) in allowed_rows]), device))
    if bans:
        banned = (_rows_of([(row, (ids,)) for row, ids in bans], device),
                  to_device(torch.cat([ids for _, ids in bans]), device))
    return SamplingBatch(
        temperature=column([p.temperature for p in params]),
        all_greedy=all(p.greedy for p in params),
        any_greedy=any(p.greedy for p in params),
        top_k=column([min(p.top_k, vocab_size) or vocab_size for p in params], torch.int64)
        if any(p.top_k for p in params) else None,
        top_p=column([p.top_p for p in params]) if any(p.top_p < 1 for p in params) else None,
        min_p=column([p.min_p for p in params]) if any(p.min_p > 0 for p in params) else None,
        generators={row: generators[r.req_id] for row, r in enumerate(requests)
                    if r.req_id in generators},
        penalties=penalties,
        logit_bias=logit_bias,
        banned=banned,
        allowed=allowed,
        num_logprobs=[p.logprobs for p in params],
        noise_keys=None if noise_keys is None else [
            noise_key(noise_keys[r.req_id], len(r.prompt_token_ids) + len(r.output_token_ids))
            for r in requests],
    )


def token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor,
                   num_top: list[int | None]) -> list[TokenLogprobs | None]:
    """logprobs: [N, V]; chosen: [N]. One entry per row that asked for logprobs."""
    chosen_lp = logprobs.gather(1, chosen[:, None])  # [N, 1]
    ranks = (logprobs > chosen_lp).sum(-1) + 1
    k = max((n for n in num_top if n), default=0)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    chosen_list, lp_list, rank_list = chosen.tolist(), chosen_lp[:, 0].tolist(), ranks.tolist()
    top_ids_list = top_ids.tolist() if k else []
    top_lp_list = top_lp.tolist() if k else []
    entries: list[TokenLogprobs | None] = []
    for row, n in enumerate(num_top):
        if n is None:
            entries.append(None)
            continue
        entries.append(TokenLogprobs(
            token_ids=[chosen_list[row]] + (top_ids_list[row][:n] if n else []),
            logprobs=[lp_list[row]] + (top_lp_list[row][:n] if n else []),
            ranks=[rank_list[row]] + list(range(1, n + 1)),
        ))
    return entries


class Sampler:
    def __init__(self, generator: torch.Generator, native: ModuleType | None = None) -> None:
        self.generator = generator  # for rows without a seed of their own
        # the native CPU kernels, whose argmax_rows takes a greedy step's choice over all
        # the cores (PyTorch's reduces a row on one), the same index as argmax(); a build
        # from before it (benchmarks/decode_builds.py loads one) has none
        self.native = native if hasattr(native, "argmax_rows") else None

    def __call__(self, logits: torch.Tensor,
                 batch: SamplingBatch) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        """logits: [B, V] -> (token ids [B], per-row logprobs or None)."""
        wants_logprobs = any(n is not None for n in batch.num_logprobs)
        if batch.all_greedy and not wants_logprobs and batch.only_masks_logits:
            # Only the largest allowed logit matters: no float copy, no softmax, no sort.
            if batch.adjusts_logits:
                logits = self.adjust(logits, batch)
            return self.greedy(logits), [None] * len(batch.num_logprobs)
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        tokens = self.choose(self.adjust(logits, batch), batch)
        entries = (token_logprobs(raw_logprobs, tokens, batch.num_logprobs)
                   if raw_logprobs is not None else [None] * len(batch.num_logprobs))
        return tokens, entries

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """argmax(logits), through the native kernel where it applies."""
        if (self.native is not None and logits.device.type == "cpu" and logits.dim() == 2
                and logits.dtype in (torch.float32, torch.bfloat16)):
            return self.native.argmax_rows(logits)
        return argmax(logits)

    def choose(self, adjusted: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[B] tokens from adjusted float32 logits: the argmax for greedy rows, a sample for
        the others."""
        tokens = self.greedy(adjusted)
        if batch.all_greedy:
            return tokens
        return torch.where(batch.temperature == 0, tokens, self._sample(adjusted, batch))

    @staticmethod
    def adjust(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The batch's logit adjustments, out of place. Masks keep the logits' dtype (-inf is
        exact in any); biases and penalties are arithmetic, so their logits become float32."""
        if not batch.only_masks_logits:
            logits = logits.float()
        if batch.grammar is not None:
            rows, bitmask = batch.grammar
            logits = apply_token_bitmask(logits, bitmask, rows)
        if batch.logit_bias is not None:
            rows, ids, values = batch.logit_bias
            logits = logits.index_put((rows, ids), values, accumulate=True)
        if batch.allowed is not None:
            rows, ids = batch.allowed
            restricted = torch.full_like(logits, -float("inf"))
            restricted[rows, ids] = logits[rows, ids]
            keep = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
            keep[rows] = False
            logits = torch.where(keep[:, None], logits, restricted)
        if batch.banned is not None:
            logits = logits.index_put(batch.banned, torch.tensor(
                -float("inf"), dtype=logits.dtype, device=logits.device))
        if batch.penalties is not None:
            p = batch.penalties
            penalised = torch.where(logits > 0, logits / p.repetition[:, None],
                                    logits * p.repetition[:, None])
            logits = torch.where(p.seen, penalised, logits)
            logits = logits - p.frequency[:, None] * p.output_counts
            logits = logits - p.presence[:, None] * (p.output_counts > 0).float()
        return logits

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        probs = self.tempered_probs(logits, batch)
        return argmax(probs / self.exponential_noise(probs.shape, batch))

    @staticmethod
    def tempered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[B, V] adjusted logits -> the distribution a row samples from after temperature,
        top-k, top-p and min-p (rows sum to 1; greedy rows are treated as temperature 1,
        their caller takes the argmax)."""
        temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature)
        logits = logits / temperature[:, None]
        if batch.top_k is not None or batch.top_p is not None:
            logits = _top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = torch.softmax(logits, dim=-1)
        if batch.min_p is not None:
            floor = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(probs < floor, 0.0, probs)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def exponential_noise(self, shape: torch.Size, batch: SamplingBatch) -> torch.Tensor:
        """Exp(1) draws, [B, ...]: seeded rows from their own generator, in row order; with
        noise keys, each row from a generator seeded by its key alone."""
        device = batch.temperature.device
        if batch.noise_keys is not None:
            noise = torch.empty(shape, device=device)
            for row, key in enumerate(batch.noise_keys):
                noise[row].exponential_(generator=torch.Generator(device).manual_seed(key))
            return noise
        noise = torch.empty(shape, device=device).exponential_(generator=self.generator)
        for row, generator in batch.generators.items():
            noise[row].exponential_(generator=generator)
        return noise

    def uniform_noise(self, shape: torch.Size, batch: SamplingBatch) -> torch.Tensor:
        """U[0, 1) draws, [B, ...], drawn as exponential_noise is."""
        noise = torch.rand(shape, device=batch.temperature.device, generator=self.generator)
        for row, generator in batch.generators.items():
            noise[row].uniform_(generator=generator)
        return noise


def argmax(values: torch.Tensor) -> torch.Tensor:
    """The last dimension's argmax. max()'s indices are argmax's (the first of ties) and
    several times faster on the CPU (bf16 [5, 8192]: 23 against 93 us); every sampling
    and verification path uses this one, so that greedy choices agree everywhere."""
    return values.max(dim=-1).indices


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                 top_p: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], -float("inf"))
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # The most likely token always survives: its mass_before is 0.
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], -float("inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
