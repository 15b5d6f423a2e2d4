"""LLMEngine and LLM: the request API, admission checks, errors, chat."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_greedy_matches, hf_greedy, random_prompts
from kvflow import LLM, LLMEngine, SamplingParams
from kvflow.engine.args import EngineArgs


@pytest.fixture(scope="module")
def engine(checkpoint):
    return LLMEngine(EngineArgs(model=str(checkpoint("llama-gqa")), dtype="float32",
                                device="cpu", kv_cache_memory="4MiB", max_model_len=128))


def _drain(engine):
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def test_step_api_and_abort_free_everything(engine):
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(4, seed=20)):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r0", {"prompt_token_ids": [1, 2]}, params)
    streamed = []
    for _ in range(3):
        streamed += [o for o in engine.step() if o.request_id == "r1"]
    assert streamed and not streamed[-1].finished
    assert len(streamed[-1].outputs[0].token_ids) >= 2
    engine.abort_request(["r1", "r3"])
    finished = _drain(engine)
    assert set(finished) == {"r0", "r2"}
    assert all(len(o.outputs[0].token_ids) == 50 for o in finished.values())
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.pool.num_usable_blocks


def test_each_step_is_recorded_with_what_it_computed(engine):
    """What the dashboard's roofline prices, and its count of aborted requests."""
    engine.observations.steps.clear()
    aborted = engine.stats.num_aborted
    engine.add_request("steps", {"prompt_token_ids": list(range(5, 25))},
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    engine.step()
    prefill, decode = engine.observations.steps
    # 20 prompt tokens attend 1..20 positions; then one token attends 21, reading 21 tokens.
    assert (prefill.num_tokens, prefill.num_attended, prefill.num_context_tokens,
            prefill.num_logits) == (20, 210, 20, 1)
    assert (decode.num_tokens, decode.num_attended, decode.num_context_tokens,
            decode.num_logits) == (1, 21, 21, 1)
    assert prefill.seconds > 0 and prefill.finished_at <= decode.finished_at
    engine.abort_request("steps")
    engine.abort_request("steps")  # gone already: not counted again
    assert engine.stats.num_aborted == aborted + 1


def test_requests_that_cannot_fit_are_rejected(engine):
    with pytest.raises(ValueError, match=r"100.*plus max_tokens \(40\).*max_model_len=128"):
        engine.add_request("long", {"prompt_token_ids": [5] * 100}, SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="no room"):
        engine.add_request("full", {"prompt_token_ids": [5] * 128},
                           SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", {"prompt_token_ids": []}, SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 384\)"):
        engine.add_request("oov", {"prompt_token_ids": [1, 999]}, SamplingParams())
    with pytest.raises(ValueError, match="logit_bias token id 4000"):
        engine.add_request("bias", "hi", SamplingParams(logit_bias={4000: 1.0}))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("bad", 42, SamplingParams())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stop_token_ids entry 100000"):
        engine.add_request("stop", "hi", SamplingParams(stop_token_ids=[100000], min_tokens=1))
    with pytest.raises(ValueError, match="n=300 exceeds max_num_seqs=256"):
        engine.add_request("many", "hi", SamplingParams(n=300))
    assert not engine.has_unfinished_requests()


def test_colliding_ids_change_nothing(engine):
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request("0_x", {"prompt_token_ids": [5, 6]}, params)
    with pytest.raises(ValueError, match="'0_x' is already in use"):
        engine.add_request("x", {"prompt_token_ids": [5, 6]}, SamplingParams(n=2, max_tokens=2))
    finished = _drain(engine)
    assert set(finished) == {"0_x"} and not engine.has_unfinished_requests()


def test_startup_reports_kv_capacity(checkpoint, capfd):
    LLM(str(checkpoint("llama-gqa")), dtype="float32", device="cpu", kv_cache_memory="1MiB")
    # 1 MiB / (512 bytes per token * 16 tokens per block) = 128 blocks, one of them the null block
    assert "KV cache: 127 blocks of 16 tokens = 2032 tokens" in capfd.readouterr().err


def test_the_default_kv_cache_is_sized_from_the_model(checkpoint, monkeypatch):
    """Four sequences of max_model_len, within min(4 GiB, 1/4 of available RAM): a fixed
    4 GiB once put a 135M model at 5 GB resident."""
    from kvflow.worker import kv_cache

    path = str(checkpoint("llama-gqa"))  # 512 bytes per token in float32
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=300, max_num_seqs=8)
    assert llm.engine.cache_config.num_tokens == 4 * 300 // 16 * 16 - 16  # less the null block
    assert llm.engine.cache_config_info()["sized_by"] == "4 sequences of max_model_len=300"
    few = LLM(path, dtype="float32", device="cpu", max_num_seqs=2)  # 512 tokens each
    assert few.engine.cache_config.num_tokens == 2 * 512 - 16
    monkeypatch.setattr(kv_cache, "available_host_memory", lambda: 4 * 512 * 1000)
    capped = LLM(path, dtype="float32", device="cpu")  # a quarter of "RAM": 1,000 tokens
    assert capped.engine.cache_config.num_tokens == 1000 // 16 * 16 - 16
    assert capped.engine.cache_config_info()["sized_by"] == "min(4 GiB, 1/4 of available RAM)"
    explicit = LLM(path, dtype="float32", device="cpu", kv_cache_memory="1MiB")
    assert explicit.engine.cache_config_info()["sized_by"] == "kv_cache_memory"


def test_max_tokens_none_fills_the_context(engine):
    engine.add_request("fill", {"prompt_token_ids": [5] * 120},
                       SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    out = _drain(engine)["fill"].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_max_model_len_larger_than_pool(checkpoint):
    path = str(checkpoint("llama-gqa"))
    with pytest.raises(ValueError, match="max_model_len=512 does not fit"):
        LLM(path, dtype="float32", device="cpu", kv_cache_memory=64 * 512, max_model_len=512)
    with pytest.raises(ValueError, match="max_model_len=600 exceeds.*512"):
        LLM(path, dtype="float32", device="cpu", kv_cache_memory="4MiB", max_model_len=600)
    # The default (max_position_embeddings) is lowered to what the pool holds instead.
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory=64 * 512)
    assert llm.engine.max_model_len == 64 - 16


def test_priority_in_generate(checkpoint):
    llm = LLM(str(checkpoint("llama-gqa")), dtype="float32", device="cpu",
              kv_cache_memory="4MiB", max_num_seqs=1, scheduling_policy="priority")
    prompts = random_prompts(3, seed=21)
    order = []
    engine = llm.engine
    for i, (prompt, priority) in enumerate(zip(prompts, [3, 1, 2])):
        engine.add_request(str(i), {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=2, ignore_eos=True), priority=priority)
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["1", "2", "0"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=2), use_tqdm=False, priority=[3, 1, 2])
    assert [o.prompt_token_ids for o in outs] == prompts  # results stay in prompt order


def test_text_prompts_and_chat(checkpoint, hf_model):
    path = checkpoint("qwen3")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="4MiB")
    tokenizer = llm.get_tokenizer()
    out = llm.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=8,
                                                            ignore_eos=True), use_tqdm=True)[0]
    assert out.prompt == "def fibonacci(n):"
    assert out.prompt_token_ids == tokenizer.encode("def fibonacci(n):")
    assert_greedy_matches([out.outputs[0].token_ids],
                          [hf_greedy(hf_model(path), out.prompt_token_ids, 8)], 8)
    # Random weights may end on a partial UTF-8 character, which is never emitted.
    full = tokenizer.decode(out.outputs[0].token_ids)
    assert full.startswith(out.outputs[0].text)
    assert set(full[len(out.outputs[0].text):]) <= {"\ufffd"}
    messages = [{"role": "user", "content": "hi"}]
    chat = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                    use_tqdm=False)[0]
    assert chat.prompt == "<|user|>hi<|end|><|assistant|>"
    assert chat.prompt_token_ids == tokenizer.encode(chat.prompt, add_special_tokens=False)


def test_generate_rejects_bad_input_and_leaves_nothing_behind(checkpoint):
    llm = LLM(str(checkpoint("llama-gqa")), dtype="float32", device="cpu",
              kv_cache_memory="4MiB")
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": []}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate("x", [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(TypeError, match="unknown LLM option"):
        LLM(str(checkpoint("llama-gqa")), kv_cache=1)


@pytest.mark.parametrize("option,value,match", [
    ("dtype", "int8", "dtype"), ("device", "tpu", "device"), ("kv_cache_memory", "lots", "size"),
    ("scheduling_policy", "random", "scheduling_policy"), ("block_size", 0, "block_size"),
    ("max_num_seqs", 0, "max_num_seqs"), ("max_num_batched_tokens", -1, "max_num_batched"),
    ("max_model_len", 0, "max_model_len"), ("max_model_len", "3x", "token count"),
    ("tensor_parallel_size", 0, "tensor_parallel_size must be at least 1"),
    ("node_rank", 2, "node_rank must be in"), ("distributed_timeout", 0, "positive"),
    ("pipeline_parallel_size", 3, "exceeds LlamaForCausalLM.s 2 layers"),
    ("data_parallel_size", 4, "kvflow serve --data-parallel-size"),
    ("data_parallel_size", 0, "data_parallel_size must be at least 1"),
    ("gpu_memory_utilization", 0, "must be in"),
    ("max_logprobs", -2, "max_logprobs"),
])
def test_invalid_engine_options(checkpoint, option, value, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(checkpoint("llama-gqa")), **{option: value, "kv_cache_memory": "4MiB"}
            if option != "kv_cache_memory" else {option: value})


def test_vllm_engine_keywords(checkpoint, caplog, monkeypatch):
    import logging

    from kvflow.worker import kv_cache

    path = str(checkpoint("llama-gqa"))
    monkeypatch.setattr(kv_cache, "available_host_memory", lambda: 400 * 2**20)
    with caplog.at_level(logging.WARNING, logger="kvflow"):
        llm = LLM(model=path, gpu_memory_utilization=0.01, max_model_len="0.5k", device="cpu",
                  tensor_parallel_size=1, trust_remote_code=True, max_logprobs=2,
                  dtype="float32")
    assert "trust_remote_code is ignored" in caplog.text
    engine = llm.engine
    # 1% of the (pretended) 400 MiB of available RAM for the KV cache.
    per_block = engine.model_config.kv_bytes_per_token(engine.dtype) * 16
    assert engine.cache_config.num_blocks == int(0.01 * 400 * 2**20) // per_block
    assert engine.max_model_len == 500
    with pytest.raises(ValueError, match="max_logprobs=2"):
        llm.generate("x", SamplingParams(logprobs=3), use_tqdm=False)
    assert llm.generate("x", SamplingParams(logprobs=2, max_tokens=2),
                        use_tqdm=False)[0].outputs[0].logprobs
    same = LLM(model=path, kv_cache_memory_bytes="4MiB", device="cpu").engine
    assert same.cache_config.num_blocks == LLM(model=path, kv_cache_memory="4MiB",
                                               device="cpu").engine.cache_config.num_blocks


def _copy_with_config(source, target, edit) -> str:
    """A copy of a checkpoint whose config.json went through edit(config)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def _old_keys(config: dict) -> None:
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype", "float32")


def test_old_config_keys_and_dtype_auto(checkpoint, tmp_path):
    """Hub checkpoints carry rope_theta / rope_scaling / torch_dtype instead of
    rope_parameters / dtype: both spellings give the same model."""
    source = checkpoint("llama3-rope")
    old = _copy_with_config(source, tmp_path / "old-keys", _old_keys)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(2, seed=22, low=30, high=60)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    new_llm = LLM(str(source), device="cpu", kv_cache_memory="4MiB")
    old_llm = LLM(old, device="cpu", kv_cache_memory="4MiB")
    assert new_llm.engine.dtype == old_llm.engine.dtype
    assert old_llm.engine.model_config.rope == new_llm.engine.model_config.rope
    assert old_llm.engine.model_config.rope.scaling_type == "llama3"
    assert ([o.outputs[0].token_ids for o in old_llm.generate(prompts, params, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in new_llm.generate(prompts, params, use_tqdm=False)])


def test_unsupported_architecture_is_named(checkpoint, tmp_path):
    broken = _copy_with_config(checkpoint("llama-gqa"), tmp_path / "fancy",
                               lambda c: c.update(architectures=["FancyForCausalLM"]))
    with pytest.raises(ValueError, match="FancyForCausalLM.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(broken, kv_cache_memory="4MiB")


def test_unknown_rope_type_is_named(checkpoint, tmp_path):
    dynamic = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    broken = _copy_with_config(checkpoint("llama-gqa"), tmp_path / "dynamic",
                               lambda c: c.update(rope_parameters=dynamic))
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        LLM(broken, kv_cache_memory="4MiB")


def test_missing_weights_are_reported(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "missing"
    shutil.copytree(checkpoint("llama-gqa"), broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"qkv_proj.weight\[k\]"):
        LLM(str(broken), kv_cache_memory="4MiB")


def test_missing_model_explains_offline_use(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"(?s)could not be found locally or downloaded.*local"):
        LLM("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="not a directory"):
        LLM(str(tmp_path / "absent"))
