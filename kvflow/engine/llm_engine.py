"""The synchronous engine: add requests, step, abort. The HTTP server drives this loop.

One step is three calls, as in vLLM v1: the scheduler decides which tokens to compute,
the model runner computes them and samples, and the scheduler and the output processor
apply the results.
"""
from __future__ import annotations

import logging
import time
from collections import deque


from kvflow.attention.selector import select_backend
from kvflow.config import CacheConfig, SchedulerConfig
from kvflow.core.kv_manager import KVCacheManager
from kvflow.core.scheduler import Scheduler
from kvflow.engine.args import EngineArgs
from kvflow.engine.input_preparer import (InputLimits, InputPreparer, PreparedRequest,
                                         PromptType)
from kvflow.engine.output_processor import OutputProcessor
from kvflow.engine.stats import EngineStats, SpecDecodeStats, StepObservations, StepRecord
from kvflow.distributed.comm import WorkerFailedError
from kvflow.executor.base import Executor, ModelSpec, RunnerSettings
from kvflow.executor.multiproc import MultiprocExecutor, rank_threads
from kvflow.executor.uniproc import UniProcExecutor
from kvflow.models.loader import resolve_model_path
from kvflow.outputs import RequestOutput, RunnerOutput, SchedulerOutput
from kvflow.request import Request, RequestStatus
from kvflow.sampling_params import SamplingParams
from kvflow.spec_decode.builder import build_speculator
from kvflow.tokenizer.loader import load_tokenizer
from kvflow.worker.cpu_graphs import CPU_MAX_CAPTURE_SIZE
from kvflow.worker.cuda_graphs import capture_sizes
from kvflow.worker.kv_cache import default_kv_cache_memory, num_blocks_for
from kvflow.worker.model_runner import ModelRunner, StepInFlight
from kvflow.worker.host_memory import keep_freed_blocks
from kvflow.worker.threads import ThreadGovernor, configure_threads

logger = logging.getLogger(__name__)

MASK_WAIT_S = 0.01  # the longest a step with nothing to run waits for a grammar's mask


class EngineStepError(RuntimeError):
    """A step failed; `request_ids` are the requests it held (queued again to recompute).
    With `alone`, the step held one request only, so the failure is that request's or the
    engine's; otherwise each of them now runs alone for a step, to find out which."""

    def __init__(self, request_ids: list[str], cause: Exception, alone: bool) -> None:
        super().__init__(f"an engine step failed ({type(cause).__name__}: {cause}) while "
                         f"running {len(request_ids)} request(s)")
        self.request_ids = request_ids
        self.alone = alone


class _SubmitFailed(Exception):
    """A step failed as it was submitted (scheduler_output); the cause is why."""

    def __init__(self, scheduler_output: SchedulerOutput) -> None:
        super().__init__("a step failed as it was submitted")
        self.scheduler_output = scheduler_output


def _samples_ahead(scheduler_output: SchedulerOutput) -> bool:
    """Whether a step may sample as it is submitted and be followed before it is finished
    (async scheduling): none of its requests needs its tokens on the host to sample the
    next (penalties, bad words, a grammar), verifies drafts, or asks for logprobs."""
    return all(s.grammar is None and not s.draft_token_ids
               and not s.sampling_params.uses_penalties
               and not s.sampling_params.bad_words_token_ids
               and s.sampling_params.logprobs is None
               and s.sampling_params.prompt_logprobs is None
               for s in scheduler_output.scheduled)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        if args.trust_remote_code:
            logger.warning("trust_remote_code is ignored: kvflow runs its own model code for "
                           "the architectures it supports, never code from a checkpoint")
        self.args = args
        spec = ModelSpec.from_args(args)
        self.model_config, self.device, self.dtype = spec.config, spec.device, spec.dtype
        path = spec.config.path
        self.tokenizer_path = str(path if args.tokenizer is None
                                  else resolve_model_path(args.tokenizer, args.tokenizer_revision
                                                          or args.revision, args.download_dir))
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        if args.data_parallel_size != 1:
            raise ValueError(f"data_parallel_size={args.data_parallel_size}: one LLMEngine is "
                             "one engine core; `kvflow serve --data-parallel-size N` runs N "
                             "of them, each in a process of its own")
        parallel = args.parallel_config()
        if parallel.node_rank != 0:
            raise ValueError(f"node_rank={parallel.node_rank}: only node 0 runs the engine; "
                             "start the other machines' ranks with `kvflow serve MODEL "
                             "--headless` and the same parallel flags")
        # Fewer threads while other processes take cores (not in batch-invariant runs,
        # whose matmuls must split their sums alike every time, nor beside other ranks,
        # whose cores are theirs).
        self.thread_governor: ThreadGovernor | None = None
        threads = 1
        if self.device.type == "cpu":
            keep_freed_blocks()
            threads = configure_threads(args.num_threads or rank_threads(parallel))
            if not args.batch_invariant and parallel.world_size == 1:
                self.thread_governor = ThreadGovernor(threads)
            logger.info("CPU threads: %d%s", threads, ", fewer while other processes take "
                        "cores" if self.thread_governor and self.thread_governor.active else "")
        self.num_threads = threads  # a rank's
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        requested_len = spec.max_positions
        self.kernels = spec.kernels()
        self.executor: Executor = (
            UniProcExecutor(spec) if parallel.world_size == 1
            else MultiprocExecutor(spec, parallel, threads))
        rank_config = self.executor.rank_config
        if args.kv_cache_memory:
            memory, sized_by = args.kv_cache_memory, "kv_cache_memory"
        else:
            memory, sized_by = default_kv_cache_memory(
                self.device, args.gpu_memory_utilization,
                rank_config.kv_bytes_per_token(self.dtype), requested_len, args.max_num_seqs)
        num_blocks = num_blocks_for(memory, rank_config, self.dtype, args.block_size)
        self.cache_config = CacheConfig(block_size=args.block_size, num_blocks=num_blocks)
        capacity = self.cache_config.num_tokens
        max_model_len = self._fit_max_model_len(args.max_model_len, requested_len, capacity,
                                                memory)
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=max_model_len, policy=args.scheduling_policy,
            num_lookahead_tokens=(args.speculative_config.num_speculative_tokens
                                  if args.speculative_config else 0),
            num_batches=self.executor.max_in_flight)
        self.kv_cache_sized_by = sized_by
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %s) on %s, sized "
                    "by %s", self.cache_config.num_usable_blocks, args.block_size, capacity,
                    memory / 2**30, self.dtype, self.device, sized_by)
        self.kv_manager = KVCacheManager(
            num_blocks, args.block_size, enable_caching=args.enable_prefix_caching,
            cache_identity=f"{self.model_config.path}|{self.dtype}|{args.block_size}")
        self.scheduler = Scheduler(self.scheduler_config, self.kv_manager)
        # steps submitted and not yet finished, oldest first (several only in a pipeline)
        # each with how many prefix-cache registrations were made up to its scheduling
        self._in_flight: deque[tuple[SchedulerOutput, StepInFlight | None, int]] = deque()
        self._forget: set[str] = set()  # finished requests a step in flight still holds
        self.preparer = InputPreparer(self.tokenizer, InputLimits(
            vocab_size=self.model_config.vocab_size, max_model_len=max_model_len,
            max_num_seqs=args.max_num_seqs, max_logprobs=args.max_logprobs,
            block_size=args.block_size, num_usable_blocks=self.cache_config.num_usable_blocks,
            eos_token_ids=self.eos_token_ids))
        native_ops = self.kernels.native_ops
        backend = select_backend(args.attention_backend, self.device, native_ops,
                                 args.batch_invariant, self.dtype)
        logger.info("attention backend: %s; native CPU kernels: %s", backend.name,
                    "on" if native_ops is not None else "off")
        speculator = None
        if args.speculative_config is not None:
            speculator = build_speculator(args.speculative_config, self, num_blocks, backend)
            logger.info("speculative decoding: %s", args.speculative_config)
        # Decode steps captured: CUDA graphs on CUDA, the native kernels' recorded calls on
        # the CPU (smaller batches there: a step's Python costs the same at any size).
        on_cuda = self.device.type == "cuda"
        graph_sizes = [] if args.enforce_eager or not (on_cuda or native_ops is not None) else (
            capture_sizes(args.max_num_seqs, args.cuda_graph_sizes,
                          args.max_cudagraph_capture_size
                          or (None if on_cuda else CPU_MAX_CAPTURE_SIZE)))
        self.executor.initialize(
            RunnerSettings(num_blocks, args.block_size, args.seed, args.batch_invariant,
                           tuple(graph_sizes), max_model_len, self.num_speculative_tokens),
            backend, speculator)
        self.observations = StepObservations()
        self.output_processor = OutputProcessor(self.tokenizer,
                                                self.observations.inter_token_latencies)
        self._prompt_tokens = self._generation_tokens = self._num_aborted = 0
        self._internal: set[str] = set()  # requests left out of the token counts
        self._spec_decode = SpecDecodeStats() if speculator is not None else None
        self.stats = EngineStats()
        self._publish_stats()

    @staticmethod
    def _fit_max_model_len(explicit: int | None, requested: int, capacity: int,
                           memory: int) -> int:
        if requested <= capacity:
            return requested
        if explicit is not None:
            raise ValueError(
                f"max_model_len={explicit} does not fit in the KV cache, which holds {capacity} "
                f"tokens with kv_cache_memory={memory} bytes; lower max_model_len or raise "
                "kv_cache_memory")
        if capacity < 1:
            raise ValueError(f"kv_cache_memory={memory} bytes holds no KV block at all")
        logger.warning("max_model_len lowered from %d to %d: the KV cache holds no more",
                       requested, capacity)
        return capacity

    @property
    def runner(self) -> ModelRunner:
        """The runner in this process (rank 0's), which samples."""
        return self.executor.runner

    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    @property
    def num_speculative_tokens(self) -> int:
        """Drafts verified per request per step at most (0: no speculative decoding)."""
        return self.scheduler_config.num_lookahead_tokens

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0,
                    internal: bool = False) -> None:
        """`internal`: the engine's own work (a server's probe request), left out of the
        token counts that metrics report."""
        prepared = self.prepare_request(request_id, prompt, params, arrival_time, priority)
        self.add_prepared(prepared)
        if internal:
            self._internal.update(child.request_id for child in prepared.children)

    def prepare_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                        arrival_time: float | None = None, priority: int = 0) -> PreparedRequest:
        """Tokenize and validate without touching engine state, so that a server can do it on
        its own thread and answer a bad request at once."""
        return self.preparer.prepare(request_id, prompt, params, arrival_time, priority)

    def add_prepared(self, prepared: PreparedRequest) -> None:
        # Check every id before touching any state, so that a rejected add changes nothing.
        ids = [prepared.parent.request_id] + [c.request_id for c in prepared.children]
        taken = [i for i in ids if i in self.output_processor.parents
                 or i in self.output_processor.samples or i in self.scheduler.requests]
        if taken:
            raise ValueError(f"request id {taken[0]!r} is already in use")
        self.output_processor.add(prepared.parent, prepared.children)
        for child in prepared.children:
            self.scheduler.add_request(child)
        self._publish_stats()

    def abort_request(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self.output_processor.parents.get(request_id)
            if parent is None:
                continue
            self._num_aborted += 1
            for child_id in parent.child_ids:
                self.scheduler.finish_request(child_id, RequestStatus.FINISHED_ABORTED)
            self.output_processor.drop(request_id)
        self._publish_stats()

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (as vLLM's reset_prefix_cache); returns how many blocks
        were cached. Call it on the thread that steps the engine."""
        return self.kv_manager.reset_prefix_cache()

    def cache_config_info(self) -> dict[str, str]:
        """The KV cache's configuration, with the names of vLLM's cache_config_info."""
        return {"block_size": str(self.cache_config.block_size),
                "num_gpu_blocks": str(self.cache_config.num_usable_blocks),
                "cache_dtype": str(self.dtype).removeprefix("torch."),
                "enable_prefix_caching": str(self.kv_manager.enable_caching),
                "gpu_memory_utilization": str(self.args.gpu_memory_utilization or ""),
                "num_tokens": str(self.cache_config.num_tokens),
                "sized_by": self.kv_cache_sized_by,
                "device": self.device.type}

    def _publish_stats(self) -> None:
        """A fresh EngineStats, replaced whole so that readers on other threads see one
        consistent state. Called on the thread that steps the engine, after every change."""
        scheduler, cache = self.scheduler, self.kv_manager.stats
        self.stats = EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_cache_usage=self.kv_manager.usage,
            num_preemptions=scheduler.num_preemptions_total,
            prefix_cache_queries=cache.queries, prefix_cache_hits=cache.hits,
            prompt_tokens=self._prompt_tokens, generation_tokens=self._generation_tokens,
            num_aborted=self._num_aborted, spec_decode=self._spec_decode)

    def _count_step(self, scheduled: SchedulerOutput, runner_output: RunnerOutput,
                    updated: list[tuple[Request, int]], started: float) -> None:
        drafted, accepted = [], []
        attended = context = logits = 0
        for request in scheduled.scheduled:
            # Positions start..start+computed-1, each attending every position up to its own.
            start = request.num_computed_tokens
            computed = len(request.token_ids) + len(request.draft_token_ids)
            attended += computed * start + computed * (computed + 1) // 2
            context += start + computed
            logits += (1 + len(request.draft_token_ids)) if request.sample else 0
            if request.req_id in self._internal:
                continue
            end = min(start + len(request.token_ids), len(request.prompt_token_ids))
            self._prompt_tokens += max(0, end - start)
            sampled = runner_output.sampled_token_ids.get(request.req_id)
            if request.draft_token_ids and sampled is not None:  # not deferred: verified
                drafted.append(len(request.draft_token_ids))
                accepted.append(len(sampled) - 1)
        self._generation_tokens += sum(num_new for request, num_new in updated
                                       if request.request_id not in self._internal)
        self._internal -= {request.request_id for request, _ in updated
                           if request.status.finished}
        if drafted and self._spec_decode is not None:
            self._spec_decode = self._spec_decode.plus(drafted, accepted)
        self.observations.iteration_tokens.append(scheduled.num_batched_tokens)
        now = time.monotonic()
        self.observations.steps.append(StepRecord(
            finished_at=now, seconds=now - started, num_tokens=scheduled.num_batched_tokens,
            num_attended=attended, num_context_tokens=context, num_logits=logits))

    def shutdown(self) -> None:
        """Stops the executor's worker processes, if it has any; idempotent."""
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.parents)

    def _fill_pipeline(self) -> None:
        """Submits steps until as many are in flight as the executor holds (one, except
        in a pipeline) or nothing more can be scheduled. Each takes requests that no step
        in flight holds; the running ones are shared out among the steps to be formed."""
        while len(self._in_flight) < self.executor.max_in_flight:
            in_flight = {s.req_id for output, *_ in self._in_flight for s in output.scheduled}
            scheduler_output = self.scheduler.schedule(
                in_flight, self.executor.max_in_flight - len(self._in_flight))
            if not self._submit(scheduler_output, in_flight):
                return

    def _submit(self, scheduler_output: SchedulerOutput, in_flight: set[str],
                previous: StepInFlight | None = None) -> bool:
        """Submits a scheduled step (False: it holds nothing). Under async scheduling a
        step whose requests allow it samples on the device at once, so that the next can
        be submitted before it is finished."""
        # A request finished while a step held it is forgotten once that step is back.
        self._forget |= scheduler_output.finished_req_ids
        self.executor.forget(self._forget - in_flight)
        self._forget &= in_flight
        if not scheduler_output.scheduled:
            return False
        try:
            step = self.executor.submit(scheduler_output, previous, self.args.async_scheduling
                                        and _samples_ahead(scheduler_output))
        except BaseException as exc:
            raise _SubmitFailed(scheduler_output) from exc
        self._in_flight.append((scheduler_output, step, self.kv_manager.num_unconfirmed))
        return True

    def _submit_ahead(self) -> None:
        """Async scheduling: with one step in flight that sampled on submission, the next
        is formed and submitted now, its requests' placeholders read from that step's
        tokens on the device, while the host finishes the step in flight. Not while a
        request runs alone after a failure."""
        if len(self._in_flight) != 1 or self.scheduler.isolated:
            return
        scheduler_output, step, _ = self._in_flight[0]
        if step is None or not _samples_ahead(scheduler_output):
            return
        self.scheduler.apply_ahead(scheduler_output)
        self._submit(self.scheduler.schedule(ahead=True),
                     {s.req_id for s in scheduler_output.scheduled}, previous=step)

    def step(self) -> list[RequestOutput]:
        """Raises EngineStepError if scheduling or the forward pass fails; the requests of
        that step are then queued to be computed again (abort them to give up on them).
        Raises WorkerFailedError if a rank has failed: the engine cannot step again."""
        started = time.monotonic()
        scheduler_output = None
        if self.thread_governor is not None:
            self.thread_governor.poll()
        try:
            self._fill_pipeline()
            if self.args.async_scheduling:
                self._submit_ahead()
            if self._in_flight:
                scheduler_output, step, registered = self._in_flight.popleft()
                runner_output = self.executor.finish(step)
            else:
                runner_output = None
        except BaseException as raised:
            exc = raised
            if isinstance(raised, _SubmitFailed):  # the step being submitted failed
                scheduler_output, exc = raised.scheduler_output, raised.__cause__
            if isinstance(exc, WorkerFailedError):
                raise exc  # no step can run again: nothing to recompute
            # Blocks this step was to fill hold no valid KV: they must not be found, and the
            # requests that counted on them start again.
            self.kv_manager.unregister_unconfirmed()
            self._in_flight = deque((output, step, 0) for output, step, _ in self._in_flight)
            child_ids = self.scheduler.recompute_after_failure(scheduler_output)
            self._publish_stats()
            if not isinstance(exc, Exception):
                raise exc
            parents = {self.output_processor.samples[c].parent.request_id for c in child_ids
                       if c in self.output_processor.samples}
            alone = len(child_ids) <= 1
            if not alone:
                self.scheduler.isolate(child_ids)
            raise EngineStepError(sorted(parents), exc, alone) from exc
        if runner_output is None:
            self.kv_manager.confirm_registered()
            self._publish_stats()
            # Every running request may be waiting for its grammar's mask: wait for one,
            # rather than spin.
            self.executor.wait_for_masks(MASK_WAIT_S)
            return []
        # What the steps still in flight registered waits for them.
        self.kv_manager.confirm_registered(registered)
        self._in_flight = deque((output, step, mark - registered)
                                for output, step, mark in self._in_flight)
        updated = self.scheduler.update_from_output(scheduler_output, runner_output)
        outputs, stopped = self.output_processor.process(runner_output, updated)
        for child_id in stopped:
            self.scheduler.finish_request(child_id, RequestStatus.FINISHED_STOPPED)
        self._count_step(scheduler_output, runner_output, updated, started)
        self._publish_stats()
        return outputs
