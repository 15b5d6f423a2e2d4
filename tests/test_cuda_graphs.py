"""CUDA graphs' bookkeeping on the CPU (kvflow/worker/cuda_graphs.py): which sizes are
captured, which size a batch pads to, what a padded step writes and reads, what makes a
capture stale, and an engine whose decode steps run through the captured path, token for
token with transformers. Here a "graph" replays by calling the captured function again:
it reads the same static buffers a CUDA graph reads, and the Triton attention backend
(under its interpreter) is the one a graph captures on a GPU."""
from __future__ import annotations

import pytest
import torch

from kvflow.engine.args import EngineArgs
from kvflow.worker.cuda_graphs import DecodeGraphs, capture_sizes, padded_size


def test_capture_sizes_follow_vllms_ladder():
    assert capture_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes(1024) == [1, 2, 4] + list(range(8, 513, 8))  # 512 at most
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]  # every batch up to max_num_seqs
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(256, [100]) == [1, 2, 4] + list(range(8, 97, 8)) + [100]
    assert capture_sizes(256, [1, 3, 64, 300]) == [1, 3, 64]  # past max_num_seqs: dropped
    assert capture_sizes(256, None, 16) == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("sizes,cap", [([], None), ([0, 4], None), (None, 0)])
def test_bad_capture_sizes_are_refused_by_name(sizes, cap):
    with pytest.raises(ValueError, match="cuda_graph_sizes|max_cudagraph_capture_size"):
        EngineArgs(cuda_graph_sizes=sizes, max_cudagraph_capture_size=cap)


def test_a_batch_pads_to_the_smallest_size_that_holds_it():
    sizes = [1, 2, 4, 8, 16]
    assert [padded_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16, 17)] == [
        1, 2, 4, 8, 8, 16, 16, None]


class CountingCapture:
    """Captures by keeping the function; a replay calls it again."""

    def __init__(self) -> None:
        self.captured: list[int] = []
        self.replays = 0

    def __call__(self, forward):
        self.captured.append(id(forward))

        def replay():
            self.replays += 1
            return forward()

        return replay


def graphed(checkpoint, kv_cache_memory="8MiB", async_scheduling=False):
    pytest.importorskip("triton", reason="triton is not installed (make test installs it)")
    from kvflow import LLM

    path = checkpoint("llama-gqa")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=kv_cache_memory,
              attention_backend="triton", max_num_seqs=6, async_scheduling=async_scheduling)
    runner = llm.engine.executor.runner
    capture = CountingCapture()
    runner.graphs = DecodeGraphs(runner.model, [1, 2, 4, 6], runner.block_size,
                                 llm.engine.max_model_len, runner.device, capture)
    runner.graphs.capture_all()
    return path, llm, capture


@pytest.fixture
def graphed_llm(checkpoint):
    return graphed(checkpoint)


# 56 KiB: 6 usable blocks of 16 tokens, where the five requests need 11 at their longest,
# so some are preempted and come back with other blocks (their persistent rows rewritten).
@pytest.mark.parametrize("kv_cache_memory,async_scheduling", [
    ("8MiB", False), ("56KiB", False), ("8MiB", True)], ids=["roomy", "preempting", "async"])
def test_decode_steps_replay_padded_graphs_and_match_transformers(
        checkpoint, hf_model, kv_cache_memory, async_scheduling):
    """Five requests of different lengths: batches of 5 pad to 6 and of 3 to 4, and the
    padding rows write nothing a real request reads. Under async scheduling a graphed
    step reads the step before it's tokens into its buffer on the device."""
    from conftest import assert_greedy_matches, hf_greedy, random_prompts
    from kvflow import SamplingParams

    path, llm, capture = graphed(checkpoint, kv_cache_memory, async_scheduling)
    assert len(capture.captured) == 4
    prompts = random_prompts(5, seed=5)
    lengths = [12, 9, 12, 6, 12]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert capture.replays >= 8
    for output, prompt, n in zip(outputs, prompts, lengths):
        assert_greedy_matches([output.outputs[0].token_ids], [hf_greedy(hf_model(path), prompt, n)],
                              n)
    pool = llm.engine.kv_manager.pool
    assert pool.num_free_blocks == pool.num_usable_blocks
    assert (llm.engine.scheduler.num_preemptions_total > 0) == (kv_cache_memory == "56KiB")
    if async_scheduling:
        assert llm.engine.scheduler.requests == {} and not llm.engine._in_flight


def test_steps_a_graph_does_not_hold_run_eagerly(graphed_llm):
    from kvflow.outputs import ScheduledRequest
    from kvflow.sampling_params import SamplingParams

    _, llm, _ = graphed_llm
    graphs = llm.engine.executor.runner.graphs

    def request(tokens, drafts=()):
        return ScheduledRequest("r", list(tokens), 4, [1], True, SamplingParams(), [1, 2, 3, 4],
                                [], frozenset(), draft_token_ids=list(drafts))

    assert graphs.queries_of([request([5])] * 6) == 1
    assert graphs.queries_of([request([5])] * 7) is None  # past the largest size
    assert graphs.queries_of([request([5, 6])]) is None  # a prefill chunk
    assert graphs.queries_of([request([5], drafts=[7, 8])]) is None  # verification


def test_a_rebound_kv_cache_makes_the_capture_stale(graphed_llm):
    """The graphs read the cache they were captured with: bound to a new one, they are
    captured again before the next replay."""
    from kvflow import SamplingParams
    from kvflow.models.builder import bind_kv_cache

    _, llm, capture = graphed_llm
    runner = llm.engine.executor.runner
    assert not runner.graphs.stale
    bind_kv_cache(runner.model, runner.config, runner.backend,
                  llm.engine.cache_config.num_blocks, runner.block_size, torch.float32,
                  runner.device)
    assert runner.graphs.stale
    llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                 SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert len(capture.captured) == 8 and not runner.graphs.stale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (scripts/cuda_check.sh)")
def test_cuda_graphs_on_a_gpu_match_transformers(checkpoint, hf_model):
    """On a GPU: real captures, replayed for every decode step, greedy tokens equal to
    transformers' (float32), and the same with --enforce-eager (no graphs)."""
    from conftest import assert_greedy_matches, hf_greedy, random_prompts
    from kvflow import LLM, SamplingParams

    path = checkpoint("llama-gqa")
    prompts = random_prompts(5, seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reference = [hf_greedy(hf_model(path), p, 12) for p in prompts]
    for enforce_eager in (False, True):
        llm = LLM(str(path), dtype="float32", device="cuda", kv_cache_memory="64MiB",
                  max_num_seqs=8, enforce_eager=enforce_eager)
        assert (llm.engine.executor.runner.graphs is None) == enforce_eager
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        assert_greedy_matches([o.outputs[0].token_ids for o in outputs], reference, 12)


def test_verification_steps_replay_graphs_of_k_plus_one_tokens(checkpoint, hf_model):
    """Prompt lookup proposing up to 3 drafts: a verification step runs the graph of 4
    tokens per request, a request with fewer drafts padded in front (tokens that write no
    KV), and the tokens are still transformers' greedy ones."""
    pytest.importorskip("triton", reason="triton is not installed (make test installs it)")
    from conftest import assert_greedy_matches, hf_greedy
    from kvflow import LLM, SamplingParams

    path = checkpoint("llama-gqa")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB",
              attention_backend="triton", max_num_seqs=4,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                  "prompt_lookup_min": 1, "prompt_lookup_max": 2,
                                  "disable_by_batch_size": None, "min_acceptance_rate": 0.0})
    runner = llm.engine.executor.runner
    capture = CountingCapture()
    runner.graphs = DecodeGraphs(runner.model, [1, 2, 4, 8], runner.block_size,
                                 llm.engine.max_model_len, runner.device, capture, num_drafts=3)
    runner.graphs.capture_all()
    assert runner.graphs.sizes == {1: [1, 2, 4, 8], 4: [1, 2]}
    used = []
    run = runner.graphs.run
    runner.graphs.run = lambda batch, queries, *a: used.append(queries) or run(batch, queries, *a)
    # repeated patterns, so that the n-gram proposer finds its suffix earlier
    prompts = [[11, 12, 13, 14] * 6, [40, 41, 42] * 7]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert 4 in used and 1 in used
    reference = [hf_greedy(hf_model(path), p, 16) for p in prompts]
    assert_greedy_matches([o.outputs[0].token_ids for o in outputs], reference, 16)


def test_vllms_graph_and_async_flags_reach_the_engine_args():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["--cuda-graph-sizes", "1", "2", "64", "--max-cudagraph-capture-size", "32",
         "--async-scheduling"]))
    assert args.cuda_graph_sizes == [1, 2, 64] and args.max_cudagraph_capture_size == 32
    assert args.async_scheduling
    assert parser.parse_args(["--cudagraph-capture-sizes", "8"]).cuda_graph_sizes == [8]
    assert capture_sizes(256, args.cuda_graph_sizes, args.max_cudagraph_capture_size) == [1, 2]


def test_the_cpu_fills_a_steps_buffers_as_the_device_does():
    """On the CPU, fill() writes the buffers through numpy in place of the device's torch
    ops, staging and copies: for decodes and for verification steps with fewer drafts
    than captured, real rows and padding rows, every buffer ends the same, step after
    step (a padding row keeps the block table it held)."""
    from kvflow.outputs import ScheduledRequest
    from kvflow.sampling_params import SamplingParams
    from kvflow.worker.cuda_graphs import DecodeBuffers

    generator = torch.Generator().manual_seed(5)
    block_size, width = 4, 8
    table = torch.randint(1, 100, (6, width), dtype=torch.int32, generator=generator)
    host, device = (DecodeBuffers(4, [1, 3], width, torch.device("cpu")) for _ in range(2))

    def request(i: int, computed: int, drafts: list[int]) -> ScheduledRequest:
        return ScheduledRequest(f"r{i}", [7 + i], computed, [], True, SamplingParams(),
                                [], [], frozenset(), draft_token_ids=drafts)

    steps = [([request(0, 9, [])], 1, 1, [2]),
             ([request(0, 10, []), request(1, 0, []), request(2, 26, [])], 4, 1, [2, 0, 5]),
             ([request(0, 11, [4, 5]), request(1, 1, [6])], 2, 3, [2, 0]),
             ([request(3, 0, [])], 4, 3, [3]),
             ([request(2, 27, [8])], 1, 3, [5])]
    for batch, size, queries, rows in steps:
        host.fill(batch, size, queries, block_size, table, rows)
        device._fill_on_device(batch, size, queries, block_size, table, rows)
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables"):
            assert torch.equal(getattr(host, name), getattr(device, name)), (name, rows)
