"""Turns a SchedulerOutput into one forward pass and sampled tokens.

Everything tensor-shaped starts here: the flat batch, its metadata, the KV cache, the
logits and the per-request random generators. What goes back is plain lists.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from kvflow.attention.base import AttentionBackend
from kvflow.attention.metadata import AttentionMetadata
from kvflow.core.kv_manager import cdiv
from kvflow.host_copy import tensor_on
from kvflow.models.blocks import CausalLM
from kvflow.models.builder import bind_kv_cache
from kvflow.models.config import ModelConfig
from kvflow.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprobs
from kvflow.request import PLACEHOLDER
from kvflow.sampling.rejection_sampler import RejectionSampler
from kvflow.sampling.sampler import (Sampler, SamplingBatch, SamplingRow, prepare_sampling,
                                     sampling_rows, token_logprobs)
from kvflow.structured_output.bitmask import MASK_GRACE_S, GrammarMasker
from kvflow.spec_decode.proposer import Speculator
from kvflow.worker.cpu_graphs import NotCapturable
from kvflow.worker.cuda_graphs import DecodeGraphs
from kvflow.worker.persistent_batch import PersistentBlockTables

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: CausalLM, config: ModelConfig, backend: AttentionBackend,
                 num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 seed: int, speculator: Speculator | None = None,
                 batch_invariant: bool = False, kv_config: ModelConfig | None = None,
                 graphs: DecodeGraphs | None = None, max_model_len: int = 0,
                 native_ops: ModuleType | None = None) -> None:
        """kv_config: the model as this rank holds it, which sizes its KV cache (None:
        config, the whole model); graphs: decode steps to capture once the cache is bound,
        and replay for the steps they take; max_model_len sizes the block-table rows (they
        grow past it if need be); native_ops: the native CPU kernels where the model runs
        them (the sampler's greedy choice takes one)."""
        self.model = model
        self.config = config
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.kv_caches = bind_kv_cache(model, kv_config or config, backend, num_blocks,
                                       block_size, dtype, device)
        # every running request's block table, kept on the device between steps
        self.block_tables = PersistentBlockTables(max(1, cdiv(max_model_len, block_size)),
                                                  device)
        self.graphs = graphs
        if graphs is not None:
            try:
                graphs.capture_all()
            except NotCapturable as exc:
                logger.warning("decode graphs: off, %s", exc)
                self.graphs = None
        self.sampler = Sampler(torch.Generator(device).manual_seed(seed), native_ops)
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.speculator = speculator
        self.generators: dict[str, torch.Generator] = {}
        # Batch-invariant mode: each request's key, its noise seeded by key and position
        # (its seed, or one drawn for it once), so that a sample depends on nothing else.
        self.noise_keys: dict[str, int] | None = {} if batch_invariant else None
        # req_id -> [drafts, vocab]: what its pending drafts were drawn from, when sampled
        self.draft_probs: dict[str, torch.Tensor] = {}
        self.grammar_masker = GrammarMasker(config.vocab_size)

    def forget(self, req_ids: set[str]) -> None:
        """Drop the state of finished requests."""
        self.block_tables.forget(req_ids)
        for req_id in req_ids:
            self.generators.pop(req_id, None)
            self.draft_probs.pop(req_id, None)
            if self.noise_keys is not None:
                self.noise_keys.pop(req_id, None)
        if self.speculator is not None:
            self.speculator.forget(req_ids)

    def wait_for_masks(self, timeout_s: float) -> None:
        """Until a grammar mask being computed is done, or timeout_s."""
        self.grammar_masker.wait_for_any(timeout_s)

    @torch.inference_mode()
    def submit(self, scheduler_output: SchedulerOutput, previous: StepInFlight | None = None,
               sample: bool = False) -> StepInFlight | None:
        """Starts a step's forward pass (None: nothing scheduled). Under pipeline
        parallelism it returns once this rank's stage is done, and the logits arrive later;
        steps are finished in the order they were submitted.

        Async scheduling: `sample` also queues the step's sampling on the device (its
        requests have no grammar, drafts, penalties or logprobs), so that the next step,
        submitted before this one is finished, reads the tokens it samples in place of its
        placeholders; `previous` is that step, for the one submitted after it."""
        # Shortest queries first: backends batch the short ones (decodes) in one call.
        if self.speculator is not None:
            self.speculator.drop_kv(scheduler_output.preempted_req_ids)
        self.block_tables.forget(scheduler_output.preempted_req_ids)
        batch = sorted(scheduler_output.scheduled,
                       key=lambda r: len(r.token_ids) + len(r.draft_token_ids))
        if not batch:
            return None
        to_sample = [r for r in batch if r.sample]
        table_rows = self.block_tables.update(batch)
        queries = self.graphs.queries_of(batch) if self.graphs is not None else None
        graphed = queries is not None
        if graphed:
            query_starts = self.graphs.query_starts(batch, queries)
        else:
            input_ids, meta, query_starts = self._prepare_inputs(batch, table_rows)
        substitute = _placeholders(batch, query_starts, previous, self.device)
        rows = LogitRows.of(batch, to_sample, query_starts)
        # The grammars' masks depend only on tokens already accepted and on the drafts, so
        # they are computed on the mask threads (the GIL released) during the forward; the
        # step waits for them a moment past it, and samples without those still computing.
        self.grammar_masker.start(to_sample)
        if graphed:
            every_row = self.graphs.run(batch, queries, self.block_tables.table, table_rows,
                                        substitute)
            picked = (every_row if rows.positions == list(range(every_row.shape[0]))
                      else every_row[tensor_on(rows.positions, self.device, torch.int64)])
            logits: Callable[[], torch.Tensor] = lambda: picked  # noqa: E731
        else:
            if substitute is not None:
                substitute(input_ids)
            logits = self.model.start_step(input_ids, meta,
                                           tensor_on(rows.positions, self.device, torch.int64))
        step = StepInFlight(batch, to_sample, rows, logits)
        if sample and to_sample:
            step.sampled = self.sampler(rows.sampled(logits(), to_sample),
                                        self._sampling_batch(to_sample, to_sample))[0]
        return step

    @torch.inference_mode()
    def finish(self, step: StepInFlight | None) -> RunnerOutput:
        if step is None:
            return RunnerOutput(sampled_token_ids={})
        if step.sampled is not None:  # sampled when submitted (async scheduling)
            return RunnerOutput(sampled_token_ids={
                r.req_id: [token] for r, token in zip(step.to_sample, step.sampled.tolist())})
        logits = step.logits()
        masks = self.grammar_masker.collect(step.to_sample, time.monotonic() + MASK_GRACE_S,
                                            self.device)
        output = RunnerOutput(sampled_token_ids={}, deferred_req_ids=masks.deferred,
                              failed=masks.failed)
        if masks.sampling:
            self._sample(masks.sampling, step.rows.sampled(logits, masks.sampling), output,
                         masks.grammar)
            if self.speculator is not None:
                self._propose(masks.sampling, output, len(step.batch))
        for request in step.batch:
            scored = step.rows.prompt.get(request.req_id)
            if scored is not None:
                first, row, count = scored
                output.prompt_logprobs[request.req_id] = self._prompt_logprobs(
                    request, logits[row:row + count], first)
        return output

    def _sample(self, requests: list[ScheduledRequest], logits: torch.Tensor,
                output: RunnerOutput, grammar: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Samples each request's next token from the logits at its last known token, or
        verifies its drafts against those at each of them."""
        verifying = any(r.draft_token_ids for r in requests)
        sampling = self._sampling_batch(requests, [row for r in requests
                                                   for row in sampling_rows(r)]
                                        if verifying else requests)
        sampling.grammar = grammar
        if verifying:
            tokens, entries = self.rejection_sampler(
                logits, sampling, [r.draft_token_ids for r in requests],
                [self._pending_draft_probs(r) for r in requests])
        else:
            sampled, single = self.sampler(logits, sampling)
            tokens = [[token] for token in sampled.tolist()]
            entries = [None if entry is None else [entry] for entry in single]
        for request, new_tokens, entry in zip(requests, tokens, entries):
            output.sampled_token_ids[request.req_id] = new_tokens
            if entry is not None:
                output.logprobs[request.req_id] = entry

    def _sampling_batch(self, requests: list[ScheduledRequest],
                        rows: list[SamplingRow] | list[ScheduledRequest]) -> SamplingBatch:
        """The sampling parameters of `rows` (the requests', or a row per draft), the
        requests' own generators made first."""
        self._ensure_generators(requests)
        return prepare_sampling(rows, self.generators, self.config.vocab_size, self.device,
                                self.noise_keys)

    def _propose(self, requests: list[ScheduledRequest], output: RunnerOutput,
                 batch_size: int) -> None:
        proposals = self.speculator.propose(requests, output.sampled_token_ids, batch_size,
                                            self.generators, self.sampler.generator)
        output.draft_token_ids = proposals.token_ids
        for request in requests:
            self.draft_probs.pop(request.req_id, None)
        self.draft_probs.update(proposals.probs)

    def _pending_draft_probs(self, request: ScheduledRequest) -> torch.Tensor | None:
        """The distributions of the drafts verified now; the scheduler may have kept only
        the first few drafts."""
        probs = self.draft_probs.get(request.req_id)
        return None if probs is None or not request.draft_token_ids \
            else probs[:len(request.draft_token_ids)]

    def _ensure_generators(self, requests: list[ScheduledRequest]) -> None:
        for request in requests:
            seed = request.sampling_params.seed
            if seed is not None and request.req_id not in self.generators:
                self.generators[request.req_id] = torch.Generator(self.device).manual_seed(seed)
            if self.noise_keys is not None and request.req_id not in self.noise_keys:
                self.noise_keys[request.req_id] = seed if seed is not None else int(
                    torch.randint(2**62, (1,), generator=self.sampler.generator))

    def _prepare_inputs(self, batch: list[ScheduledRequest], table_rows: list[int]
                        ) -> tuple[torch.Tensor, AttentionMetadata, dict[str, int]]:
        query_lens = [len(r.token_ids) + len(r.draft_token_ids) for r in batch]
        block_tables = self.block_tables.gather(table_rows,
                                                max(len(r.block_ids) for r in batch))
        meta = self.backend.build_metadata(query_lens, [r.num_computed_tokens for r in batch],
                                           block_tables, self.block_size, self.device)
        starts = itertools.accumulate(query_lens, initial=0)
        query_starts = {r.req_id: start for r, start in zip(batch, starts)}
        input_ids = tensor_on(
            list(itertools.chain.from_iterable(r.token_ids + r.draft_token_ids for r in batch)),
            self.device, torch.int64)
        return input_ids, meta, query_starts

    @staticmethod
    def _prompt_logprobs(request: ScheduledRequest, logits: torch.Tensor,
                         first: int) -> tuple[int, list[TokenLogprobs]]:
        """Logprobs of the prompt tokens this chunk predicts: position p scores token p+1."""
        end = first + logits.shape[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(request.prompt_token_ids[first + 1:end + 1],
                               device=logits.device)
        num_top = request.sampling_params.prompt_logprobs
        entries = token_logprobs(logprobs, targets, [num_top] * (end - first))
        return first + 1, entries  # type: ignore[return-value]


@dataclass
class LogitRows:
    """The rows of a step's flat batch whose logits it needs, named before the forward
    pass (so that the last pipeline stage computes them without waiting to be told):
    each sampling request's last known token and drafts, in order, then the prompt
    positions of requests that asked for prompt logprobs."""

    positions: list[int]
    sample: dict[str, tuple[int, int]]  # req_id -> (first row, rows)
    prompt: dict[str, tuple[int, int, int]]  # req_id -> (first position, first row, rows)

    @classmethod
    def of(cls, batch: list[ScheduledRequest], to_sample: list[ScheduledRequest],
           query_starts: dict[str, int]) -> LogitRows:
        positions: list[int] = []
        sample, prompt = {}, {}
        for request in to_sample:
            drafts = len(request.draft_token_ids)
            end = query_starts[request.req_id] + len(request.token_ids) + drafts
            sample[request.req_id] = (len(positions), drafts + 1)
            positions.extend(range(end - 1 - drafts, end))
        for request in batch:
            if request.sampling_params.prompt_logprobs is None:
                continue
            first = request.num_computed_tokens
            end = min(first + len(request.token_ids), len(request.prompt_token_ids) - 1)
            if end > first:
                start = query_starts[request.req_id]
                prompt[request.req_id] = (first, len(positions), end - first)
                positions.extend(range(start, start + end - first))
        return cls(positions, sample, prompt)

    def sampled(self, logits: torch.Tensor, requests: list[ScheduledRequest]) -> torch.Tensor:
        """The rows these requests sample from, in their order: a view where they are
        every sampling request (no grammar kept one waiting)."""
        spans = [self.sample[r.req_id] for r in requests]
        if len(spans) == len(self.sample):
            return logits[:sum(count for _, count in spans)]
        return logits[[row for first, count in spans for row in range(first, first + count)]]


@dataclass
class StepInFlight:
    """A submitted step: what finishing it needs."""

    batch: list[ScheduledRequest]
    to_sample: list[ScheduledRequest]
    rows: LogitRows
    logits: Callable[[], torch.Tensor]  # the rows' logits, once the forward pass is done
    # the tokens of to_sample, in its order, on the device, where sampled at submit
    sampled: torch.Tensor | None = None


def _placeholders(batch: list[ScheduledRequest], query_starts: dict[str, int],
                  previous: StepInFlight | None, device: torch.device
                  ) -> Callable[[torch.Tensor], None] | None:
    """What puts the tokens `previous` sampled in place of this batch's placeholders, in
    a step's flat input ids, on the device (None: the batch has none). A placeholder is a
    request's one token this step, so its row is where the request's queries start."""
    spots = [(query_starts[r.req_id], r.req_id) for r in batch
             if r.token_ids and r.token_ids[0] == PLACEHOLDER]
    if not spots:
        return None
    assert previous is not None and previous.sampled is not None, \
        "a placeholder with no step in flight to sample it"
    sampled_row = {r.req_id: row for row, r in enumerate(previous.to_sample)}
    where = tensor_on([spot for spot, _ in spots], device, torch.int64)
    rows = tensor_on([sampled_row[req_id] for _, req_id in spots], device, torch.int64)
    tokens = previous.sampled

    def substitute(input_ids: torch.Tensor) -> None:
        input_ids[where] = tokens[rows]

    return substitute
