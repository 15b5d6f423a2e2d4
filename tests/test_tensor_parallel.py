"""Tensor parallelism on CPU ranks: the same greedy tokens as one rank, and a failed rank
detected and reported, with every process gone."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from kvflow import LLM, SamplingParams, StructuredOutputsParams
from kvflow.distributed.comm import WorkerFailedError
from kvflow.distributed.group import ParallelConfig
from kvflow.distributed.tensor_parallel import (TensorParallel, rows_part, shard_config,
                                                summed_bias)
from kvflow.models.config import ModelConfig
from kvflow.quantization.unquantized import UnquantizedLinearMethod

from checkpoints import CORPUS
from server_process import ServerProcess, free_port

PROMPTS = [CORPUS[0], CORPUS[2][:30], CORPUS[1] + CORPUS[3], "Hello"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


def _generate(path, n_tokens=24, **options):
    llm = LLM(str(path), **{"dtype": "float32", **options})
    try:
        params = SamplingParams(max_tokens=n_tokens, temperature=0.0, logprobs=2,
                                ignore_eos=True)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        seeded = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=8, temperature=1.0,
                                                          seed=7), use_tqdm=False)
        chosen = llm.generate(PROMPTS[:2], SamplingParams(
            max_tokens=8, temperature=0.0,
            structured_outputs=StructuredOutputsParams(choice=["hello world", "fox", "dog"])),
            use_tqdm=False)
        return ([o.outputs[0].token_ids for o in outputs],
                [o.outputs[0].logprobs for o in outputs],
                [o.outputs[0].token_ids for o in seeded] + [o.outputs[0].text for o in chosen],
                llm.engine.scheduler.num_preemptions_total)
    finally:
        llm.engine.shutdown()


# Every way a rank's part of a checkpoint is cut: one KV head for two ranks (replicated)
# and a vocabulary that does not divide by two (the last shard padded); q/k/v biases;
# checkpoints that store q/k/v and gate/up fused; a tied head; quantized at load; gpt-oss.
WIDE_MHA = dict(hidden_size=128, intermediate_size=256)
CASES = {  # (variant, its overrides, options)
    "llama-kv1-odd-vocab": ("llama-gqa", dict(num_key_value_heads=1, vocab_size=387), {}),
    "qwen2-bias-int8": ("qwen2", {}, dict(quantization="int8")),
    "phi3-fused": ("phi3", {}, {}),
    # wide enough that each rank's input columns fill int4's packing blocks
    "tied-int4": ("llama-mha-tied-bias", WIDE_MHA,
                  dict(quantization="int4", quantization_group_size=32)),
    # experts split by their inner width; Qwen2-MoE's shared expert as a dense MLP
    "qwen2-moe": ("qwen2-moe", {}, {}),
    "mixtral-int8": ("mixtral", {}, dict(quantization="int8")),
    # each rank's heads' sinks; the experts' biases cut with their rows (down's summed once)
    "gpt-oss": ("gpt-oss", {}, {}),
}
POOL_TOKENS = 96  # fewer than the prompts and their outputs need at once: preemption


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_give_one_ranks_tokens(checkpoint, case):
    variant, overrides, options = CASES[case]
    path = checkpoint(variant, **overrides)
    config = ModelConfig.from_pretrained(path)
    token_bytes = config.kv_bytes_per_token(torch.float32)
    # Chunked prefill, a pool small enough to preempt, the prefix cache and speculation on.
    options = dict(options, max_num_batched_tokens=16, block_size=4, max_num_seqs=4,
                   speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                       "prompt_lookup_max": 2, "prompt_lookup_min": 1})
    one = _generate(path, kv_cache_memory=POOL_TOKENS * token_bytes, **options)
    # Each rank holds half the KV heads, or with one KV head all of it.
    rank_bytes = shard_config(config, 2).kv_bytes_per_token(torch.float32)
    two = _generate(path, tensor_parallel_size=2, kv_cache_memory=POOL_TOKENS * rank_bytes,
                    **options)
    assert one[3] > 0 and two[3] > 0
    assert two[0] == one[0]
    for a, b in zip(one[1], two[1]):
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    assert two[2] == one[2]


# (case, its tensor x pipeline layouts): a stage holding the tied embedding as its head, a
# vocabulary and KV heads that do not divide, quantized weights, experts, Gemma's scaled
# embedding on the first stage only.
PIPELINE_CASES = {
    "llama-kv1-odd-vocab": ("llama-gqa", dict(num_key_value_heads=1, vocab_size=387), {},
                            [(1, 2), (2, 2)]),
    "tied-int4": (*CASES["tied-int4"], [(1, 2)]),
    "qwen2-moe": (*CASES["qwen2-moe"], [(1, 2)]),
    "gemma2": ("gemma2", {}, {}, [(1, 2)]),
}


@pytest.mark.parametrize("case", sorted(PIPELINE_CASES))
def test_pipeline_stages_give_one_ranks_tokens(checkpoint, case):
    variant, overrides, options, layouts = PIPELINE_CASES[case]
    path = checkpoint(variant, **overrides)
    config = ModelConfig.from_pretrained(path)
    options = dict(options, max_num_batched_tokens=16, block_size=4, max_num_seqs=4,
                   speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                       "prompt_lookup_max": 2, "prompt_lookup_min": 1})
    one = _generate(path, kv_cache_memory=POOL_TOKENS * config.kv_bytes_per_token(
        torch.float32), **options)
    assert one[3] > 0
    for tp, pp in layouts:
        parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
        rank_bytes = max(parallel.model_config(config, rank).kv_bytes_per_token(torch.float32)
                         for rank in range(parallel.world_size))
        split = _generate(path, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                          kv_cache_memory=POOL_TOKENS * rank_bytes, **options)
        assert split[3] > 0, (tp, pp)
        assert split[0] == one[0], (tp, pp)
        for a, b in zip(one[1], split[1]):
            for x, y in zip(a, b):
                assert x.keys() == y.keys()
                assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
        # The constrained choices; not the seeded samples: how many drafts a step verifies
        # depends on its token budget, which the stages' batches share, and each verified
        # draft takes a draw from the request's generator.
        assert split[2][2:] == one[2][2:], (tp, pp)


def test_the_served_weight_bytes_count_every_stage(checkpoint):
    """What the dashboard prices the model by: each stage holds its own layers (and
    the untied embedding and head once), so the sum is one rank's."""
    from kvflow.engine.client import EngineFacts

    path = str(checkpoint("llama-gqa"))
    one = LLM(path, dtype="float32")
    split = LLM(path, dtype="float32", pipeline_parallel_size=2)
    try:
        assert EngineFacts.of(split.engine).weight_bytes == EngineFacts.of(
            one.engine).weight_bytes
    finally:
        split.engine.shutdown()


def test_stages_take_as_many_layers_each(checkpoint):
    from dataclasses import replace

    from kvflow.distributed.pipeline import stage_ranges

    config = replace(ModelConfig.from_pretrained(checkpoint("qwen2")), num_layers=24)
    assert stage_ranges(config, 2) == [(0, 12), (12, 24)]
    assert stage_ranges(config, 5) == [(0, 4), (4, 9), (9, 14), (14, 19), (19, 24)]
    with pytest.raises(ValueError, match="pipeline_parallel_size=25 exceeds"):
        stage_ranges(config, 25)


def test_a_rank_part_follows_the_split():
    tp = TensorParallel(rank=1, size=2)
    weight = torch.arange(24.0).view(6, 4)
    # a row split: the rank's input columns, its bias left to rank 0
    assert torch.equal(UnquantizedLinearMethod().columns_of(weight, 2, 2, 4), weight[:, 2:])
    assert torch.equal(summed_bias(torch.ones(6), tp), torch.zeros(6))
    # q: 2 rows a rank; k: one head of 1 row for both ranks (replicated)
    fused = torch.arange(6.0)  # q q q q k v
    parts = {"q": (2, 1), "k": (1, 2), "v": (1, 2)}
    assert rows_part(fused, tp, parts, None).tolist() == [2, 3, 4, 5]
    assert rows_part(torch.arange(5.0), tp, {"": (3, 1)}, None).tolist() == \
        [3, 4, 0]  # the vocabulary's last shard, padded


WIDE = dict(hidden_size=128, intermediate_size=256)  # a rank's columns in whole int4 blocks


@pytest.mark.parametrize("recipe", ["Q8_0", "Q4_K_M", "gptq"])
def test_two_ranks_split_checkpoints_stored_quantized(checkpoint, gguf_file, tmp_path,
                                                      recipe):
    """A GGUF file's or a GPTQ checkpoint's blocks cut between whole groups: each rank
    holds what one rank would, so the tokens are one rank's."""
    if recipe == "gptq":
        from test_gptq_awq import CASES as GPTQ_CASES, write_checkpoint

        path = tmp_path / "gptq"
        write_checkpoint(checkpoint("llama-gqa", **WIDE), path, GPTQ_CASES["gptq-v1-asym"])
    else:
        path = gguf_file("llama-gqa", recipe, **WIDE)[0]
    options = dict(dtype="float32", max_num_batched_tokens=16)
    assert _generate(path, **options)[0] == _generate(path, tensor_parallel_size=2,
                                                      **options)[0]


def test_what_cannot_be_split_is_refused_with_the_reason(checkpoint, gguf_file):
    config = ModelConfig.from_pretrained(checkpoint("llama-gqa"))
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        shard_config(config, 3)
    with pytest.raises(ValueError, match="experts are stored quantized"):
        LLM(str(gguf_file("mixtral", "Q8_0", sliding_window=None, intermediate_size=64)[0]),
            tensor_parallel_size=2)


SPLITS = {"tensor": dict(tensor_parallel_size=2), "pipeline": dict(pipeline_parallel_size=2)}


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_a_killed_rank_ends_the_engine_and_every_process(checkpoint, split):
    llm = LLM(str(checkpoint("llama-gqa")), dtype="float32", **SPLITS[split])
    (pid,) = llm.engine.executor.pids.values()
    llm.generate(["warm"], SamplingParams(max_tokens=2), use_tqdm=False)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerFailedError, match=rf"rank 1 \(pid {pid}\) exited with code -9"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=8), use_tqdm=False)
    with pytest.raises(WorkerFailedError):  # and every step after
        llm.generate(["again"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not _alive(pid)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_a_hung_rank_is_declared_failed_after_the_timeout(checkpoint, split):
    # Long enough that a rank loading its shard a little late is not taken for hung.
    llm = LLM(str(checkpoint("llama-gqa")), dtype="float32", distributed_timeout=5,
              **SPLITS[split])
    (pid,) = llm.engine.executor.pids.values()
    llm.generate(["warm"], SamplingParams(max_tokens=2), use_tqdm=False)
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(WorkerFailedError, match="(did not take part|sent nothing) within 5 s"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=8), use_tqdm=False)
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_ranks_wait_for_work_past_the_timeout(checkpoint, split):
    """An idle engine's ranks wait for the next step as long as it takes: the timeout is
    for a rank that does not take part in a step."""
    llm = LLM(str(checkpoint("llama-gqa")), dtype="float32", distributed_timeout=5,
              **SPLITS[split])
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0)
        first = llm.generate(["idle"], params, use_tqdm=False)[0].outputs[0].token_ids
        time.sleep(6)
        assert llm.generate(["idle"], params, use_tqdm=False)[0].outputs[0].token_ids == first
    finally:
        llm.engine.shutdown()


def test_a_rank_that_never_joins_ends_startup_with_a_message(checkpoint):
    started = time.monotonic()
    with pytest.raises(WorkerFailedError, match=r"rank\(s\) 1 did not join within 3 s"):
        LLM(str(checkpoint("llama-gqa")), tensor_parallel_size=2, nnodes=2,
            master_port=free_port(), distributed_timeout=3, dtype="float32")
    assert time.monotonic() - started < 30


def test_a_killed_rank_mid_stream_ends_the_stream_and_the_server(checkpoint, tmp_path):
    server = ServerProcess(checkpoint("llama-gqa"), "-tp", "2", "--dtype", "float32",
                           log=tmp_path / "server.log")
    try:
        server.wait_ready()
        found = re.search(r"on this machine \(pids (\d+)\)", server.log_path.read_text())
        worker = int(found[1])
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        stream = client.completions.create(model=str(checkpoint("llama-gqa")), prompt="Hello",
                                           max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        code = server.process.wait(timeout=30)
        assert code != 0
        log = (tmp_path / "server.log").read_text()
        assert f"rank 1 (pid {worker}) exited with code -9" in log
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url + "/health", timeout=2)
        assert not _alive(worker)
    finally:
        if server.process.poll() is None:
            server.process.kill()


@pytest.mark.parametrize("split", ["-tp", "-pp"])  # a stage a machine, with -pp
def test_two_nodes_on_loopback_serve_a_request(checkpoint, tmp_path, split):
    path = checkpoint("llama-gqa")
    port = free_port()
    flags = [split, "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port",
             str(port), "--dtype", "float32"]
    node1_log = (tmp_path / "node1.log").open("w")
    node1 = subprocess.Popen([sys.executable, "-m", "kvflow.cli", "serve", str(path),
                              *flags, "--node-rank", "1", "--headless"],
                             stdout=node1_log, stderr=subprocess.STDOUT)
    server = ServerProcess(path, *flags, log=tmp_path / "node0.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        reply = client.completions.create(model=str(path), prompt=PROMPTS[0], max_tokens=12,
                                          temperature=0)
        expected = LLM(str(path), dtype="float32").generate(
            [PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
        assert reply.choices[0].text == expected[0].outputs[0].text
        assert server.stop()
        assert node1.wait(timeout=30) == 0  # its ranks stop cleanly when node 0 does
    finally:
        for process in (server.process, node1):
            if process.poll() is None:
                process.kill()
        node1_log.close()


def _rank_collectives(rank: int, port: int, path: str) -> None:
    """One rank of test_shared_memory_collectives_match_their_definitions (in a process of
    its own): every collective, over and under the slot and message sizes."""
    from pathlib import Path

    from kvflow.distributed import comm as comm_module
    from kvflow.distributed.group import ParallelConfig, connect, open_store

    parallel = ParallelConfig(tensor_parallel_size=2, master_port=port, timeout_s=30)
    store = open_store(parallel, rank)
    gloo = connect(store, parallel, rank, lambda: None, None, 8, torch.float32).tp
    shm = comm_module.ShmCommunicator(Path(path), rank, 2, gloo, lambda: None, 30)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((3,), (700, 9), (5, 3000)):  # within a slot, several rows a slot, past
            mine = torch.randn(shape, generator=torch.Generator().manual_seed(rank)).to(dtype)
            theirs = torch.randn(shape, generator=torch.Generator().manual_seed(1 - rank)
                                 ).to(dtype)
            both = [mine, theirs] if rank == 0 else [theirs, mine]
            assert torch.equal(shm.all_reduce(mine.clone()), both[0] + both[1])
            assert torch.equal(shm.all_gather(mine), torch.cat(both, dim=-1))
    message = {"ids": np.arange(50_000)} if rank == 0 else None  # past MESSAGE_BYTES
    for _ in range(3):
        got = shm.broadcast(message)
        assert np.array_equal(got["ids"], np.arange(50_000))
        assert shm.broadcast((rank, "small") if rank == 0 else None) == (0, "small")
    shm.close()
    print(f"rank {rank} ok", flush=True)


def test_shared_memory_collectives_match_their_definitions():
    # Small slots and message area, so that every path runs: within one, over several, past.
    small = ("from kvflow.distributed import comm; comm.SLOT_BYTES = 4096; "
             "comm.MESSAGE_BYTES = 4096; ")
    made = subprocess.run([sys.executable, "-c", small + "print(comm.ShmCommunicator.create(2))"],
                          capture_output=True, text=True, check=True)
    path = made.stdout.strip()
    code = small + "import test_tensor_parallel as t; t._rank_collectives({}, {}, {!r})"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", code.format(rank, port, path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    finally:
        os.unlink(path)
    for rank, output in enumerate(outputs):
        assert f"rank {rank} ok" in output, output[-3000:]
