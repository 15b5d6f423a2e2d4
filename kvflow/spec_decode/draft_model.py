"""A small model with the target's tokenizer proposes drafts, in kvflow itself.

The draft keeps its own paged KV cache with as many blocks as the target's and reads the
target's block tables, so the scheduler's allocation (with its lookahead slots) covers
both, and a request's draft KV is freed with its blocks. Per request the proposer only
remembers how many tokens its cache holds. Each proposal is k forwards: the first takes
every token the draft has not yet seen (the whole prompt for a new request, then the
tokens the last step accepted) and gives the first draft; each next one feeds the draft
just chosen. The drafts' own KV, written past the request's tokens, is overwritten when
the next proposal catches up, so the cache never needs rolling back.

A greedy request gets the draft's argmax, a one-hot proposal, which is all it can accept.
A sampled request gets drafts drawn from the draft's distribution at the request's
temperature, q, which the rejection sampler is given: a draft is then accepted with
probability sum(min(p, q)) rather than p(argmax q), about twice as often on the demo pair
at temperature 0.8 (scripts/eval_demo_model.py measures both). Either way what the target
emits is exactly its own distribution.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.attention.metadata import padded_block_tables
from kvflow.models.blocks import CausalLM
from kvflow.models.builder import bind_kv_cache, build_model
from kvflow.models.config import ModelConfig
from kvflow.models.loader import resolve_model_path
from kvflow.sampling.sampler import argmax
from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.proposer import ProposalRequest, Proposals, Proposer

if TYPE_CHECKING:
    from kvflow.engine.llm_engine import LLMEngine


class DraftModelProposer(Proposer):
    def __init__(self, model: CausalLM, backend: AttentionBackend, block_size: int,
                 num_speculative_tokens: int, max_positions: int, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.k = num_speculative_tokens
        self.device = device
        self.max_positions = max_positions
        self._num_cached: dict[str, int] = {}  # request -> tokens whose draft KV is cached

    @classmethod
    def build(cls, config: SpeculativeConfig, engine: LLMEngine, num_blocks: int,
              backend: AttentionBackend) -> DraftModelProposer:
        assert config.model is not None
        args = engine.args
        draft_config = ModelConfig.from_pretrained(
            resolve_model_path(config.model, None, args.download_dir))
        target_vocab = engine.model_config.vocab_size
        if draft_config.vocab_size != target_vocab:
            raise ValueError(f"the draft model {config.model} has a vocabulary of "
                             f"{draft_config.vocab_size} tokens and the target "
                             f"{target_vocab}: a draft must share the target's tokenizer")
        max_positions = min(draft_config.max_position_embeddings, engine.max_model_len)
        # The engine's builder and kernel choice: the draft runs what the target runs
        # (quantized kernels, batch-invariant ones) on the same backend.
        model = build_model(draft_config, engine.dtype, engine.device, max_positions,
                            engine.kernels)
        bind_kv_cache(model, draft_config, backend, num_blocks, args.block_size, engine.dtype,
                      engine.device)
        return cls(model, backend, args.block_size, config.num_speculative_tokens,
                   max_positions, engine.device)

    def forget(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            self._num_cached.pop(req_id, None)

    @torch.inference_mode()
    def propose(self, requests: list[ProposalRequest]) -> Proposals:
        # The draft's positions end at its own max_position_embeddings.
        requests = [r for r in requests
                    if len(r.token_ids) + min(self.k, r.max_drafts) <= self.max_positions]
        if not requests:
            return Proposals()
        # Catch up on every token not yet seen; shortest queries first, as backends want.
        starts = {r.req_id: self._num_cached.get(r.req_id, 0) for r in requests}
        requests.sort(key=lambda r: len(r.token_ids) - starts[r.req_id])
        queries = [r.token_ids[starts[r.req_id]:] for r in requests]
        logits = self._forward(requests, queries, [starts[r.req_id] for r in requests])
        first, first_probs = self._choose(requests, logits)
        drafts = [[token] for token in first]
        probs = [[row] for row in first_probs]
        for request in requests:
            self._num_cached[request.req_id] = len(request.token_ids)
        for step in range(1, self.k):
            active = [i for i, r in enumerate(requests) if r.max_drafts > step]
            if not active:
                break
            chosen = [requests[i] for i in active]
            logits = self._forward(chosen, [[drafts[i][-1]] for i in active],
                                   [len(requests[i].token_ids) + step - 1 for i in active])
            tokens, rows = self._choose(chosen, logits)
            for i, token, row in zip(active, tokens, rows):
                drafts[i].append(token)
                probs[i].append(row)
        return Proposals(
            token_ids={r.req_id: d for r, d in zip(requests, drafts)},
            probs={r.req_id: torch.stack(p) for r, p in zip(requests, probs)
                   if r.temperature > 0})

    def _forward(self, requests: list[ProposalRequest], queries: list[list[int]],
                 num_computed: list[int]) -> torch.Tensor:
        """One batched forward of the draft; the logits after each request's query."""
        query_lens = [len(q) for q in queries]
        meta = self.backend.build_metadata(
            query_lens, num_computed,
            padded_block_tables([r.block_ids for r in requests], self.device),
            self.block_size, self.device)
        input_ids = torch.tensor([t for q in queries for t in q], dtype=torch.int64,
                                 device=self.device)
        hidden = self.model(input_ids, meta)
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
        return self.model.compute_logits(hidden[last]).float()

    @staticmethod
    def _choose(requests: list[ProposalRequest], logits: torch.Tensor
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        """Each request's next draft: the argmax for a greedy request, else a draw from the
        draft's distribution at the request's temperature (returned with the token)."""
        tokens = argmax(logits)
        probs: list[torch.Tensor | None] = [None] * len(requests)
        for row, request in enumerate(requests):
            if request.temperature > 0:
                q = torch.softmax(logits[row] / request.temperature, dim=-1)
                noise = torch.empty_like(q).exponential_(generator=request.generator)
                tokens[row] = argmax(q / noise)
                probs[row] = q
        return tokens.tolist(), probs
