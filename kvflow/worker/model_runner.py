"""Turns a SchedulerOutput into one forward pass and sampled tokens.

Everything tensor-shaped starts here: the flat batch, its metadata, the KV cache, the
logits and the per-request random generators. What goes back is plain lists.
"""
from __future__ import annotations

import torch

from kvflow.config import ModelConfig
from kvflow.models.llama import LlamaForCausalLM
from kvflow.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprobs
from kvflow.sampling.sampler import Sampler, prepare_sampling, token_logprobs
from kvflow.worker.forward_meta import ForwardMetadata, PrefillChunk
from kvflow.worker.kv_cache import allocate_kv_cache


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, config: ModelConfig, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device, seed: int) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        self.kv_caches = allocate_kv_cache(config, num_blocks, block_size, dtype, device)
        for layer, (k_cache, v_cache) in zip(model.attention_layers(), self.kv_caches):
            layer.k_cache, layer.v_cache = k_cache, v_cache
        self.sampler = Sampler(torch.Generator(device).manual_seed(seed))
        self.generators: dict[str, torch.Generator] = {}

    def forget(self, req_ids: set[str]) -> None:
        """Drop the state of finished requests."""
        for req_id in req_ids:
            self.generators.pop(req_id, None)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        # Decodes first: the attention batches them in one call.
        batch = sorted(scheduler_output.scheduled, key=lambda r: len(r.token_ids) != 1)
        if not batch:
            return RunnerOutput(sampled_token_ids={})
        input_ids, meta, query_starts = self._prepare_inputs(batch)
        hidden = self.model(input_ids, meta)

        output = RunnerOutput(sampled_token_ids={})
        to_sample = [r for r in batch if r.sample]
        if to_sample:
            last = torch.tensor([query_starts[r.req_id] + len(r.token_ids) - 1 for r in to_sample],
                                device=self.device)
            logits = self.model.compute_logits(hidden[last])
            self._ensure_generators(to_sample)
            sampling = prepare_sampling(to_sample, self.generators, self.config.vocab_size,
                                        self.device)
            tokens, logprobs = self.sampler(logits, sampling)
            for request, token, entry in zip(to_sample, tokens.tolist(), logprobs):
                output.sampled_token_ids[request.req_id] = token
                if entry is not None:
                    output.logprobs[request.req_id] = entry
        for request in batch:
            if request.sampling_params.prompt_logprobs is not None:
                scored = self._prompt_logprobs(request, hidden, query_starts[request.req_id])
                if scored is not None:
                    output.prompt_logprobs[request.req_id] = scored
        return output

    def _ensure_generators(self, requests: list[ScheduledRequest]) -> None:
        for request in requests:
            seed = request.sampling_params.seed
            if seed is not None and request.req_id not in self.generators:
                self.generators[request.req_id] = torch.Generator(self.device).manual_seed(seed)

    def _prepare_inputs(self, batch: list[ScheduledRequest]
                        ) -> tuple[torch.Tensor, ForwardMetadata, dict[str, int]]:
        query_lens = [len(r.token_ids) for r in batch]
        starts = torch.tensor([r.num_computed_tokens for r in batch])
        width = max(len(r.block_ids) for r in batch)
        block_tables = torch.tensor([r.block_ids + [0] * (width - len(r.block_ids))
                                     for r in batch], dtype=torch.int64)
        # Per token: its request's row, and its offset inside that request's chunk.
        lens = torch.tensor(query_lens)
        row = torch.repeat_interleave(torch.arange(len(batch)), lens)
        cu_lens = torch.cumsum(lens, 0) - lens
        positions = starts[row] + torch.arange(int(lens.sum())) - cu_lens[row]
        slots = (block_tables[row, positions // self.block_size] * self.block_size
                 + positions % self.block_size)

        num_decodes = sum(1 for n in query_lens if n == 1)
        query_starts = {r.req_id: start for r, start in zip(batch, cu_lens.tolist())}
        device = self.device
        prefills = [
            PrefillChunk(query_start=query_starts[r.req_id], query_len=len(r.token_ids),
                         num_computed_tokens=r.num_computed_tokens,
                         block_table=block_tables[i, :len(r.block_ids)].to(device))
            for i, r in enumerate(batch[num_decodes:], start=num_decodes)
        ]
        meta = ForwardMetadata(
            positions=positions.to(device),
            slot_mapping=slots.to(device),
            num_decodes=num_decodes,
            decode_block_tables=block_tables[:num_decodes].to(device),
            decode_seq_lens=(starts[:num_decodes] + 1).to(device),
            prefills=prefills,
        )
        input_ids = torch.tensor([t for r in batch for t in r.token_ids], dtype=torch.int64,
                                 device=device)
        return input_ids, meta, query_starts

    def _prompt_logprobs(self, request: ScheduledRequest, hidden: torch.Tensor,
                         query_start: int) -> tuple[int, list[TokenLogprobs]] | None:
        """Logprobs of the prompt tokens this chunk predicts: position p scores token p+1."""
        first = request.num_computed_tokens
        end = min(first + len(request.token_ids), len(request.prompt_token_ids) - 1)
        if end <= first:
            return None
        rows = hidden[query_start:query_start + end - first]
        logprobs = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1)
        targets = torch.tensor(request.prompt_token_ids[first + 1:end + 1], device=self.device)
        num_top = request.sampling_params.prompt_logprobs
        entries = token_logprobs(logprobs, targets, [num_top] * (end - first))
        return first + 1, entries  # type: ignore[return-value]
