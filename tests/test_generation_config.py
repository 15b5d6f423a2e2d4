"""Model defaults: generation_config.json's sampling values for what a request leaves unset
(--generation-config auto|vllm|FOLDER, --override-generation-config), offline."""
from __future__ import annotations

import json
import shutil

import pytest

from kvflow import LLM, SamplingParams
from kvflow.engine.generation_config import load_generation_defaults

# What a model maker writes: greedy, with the other keys it recommends.
RECOMMENDED = {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "min_p": 0.05,
               "repetition_penalty": 1.05, "max_new_tokens": 6, "do_sample": True,
               "eos_token_id": 0}
AS_PARAMS = {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "min_p": 0.05,
             "repetition_penalty": 1.05, "max_tokens": 6}


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recommended") / "model"
    shutil.copytree(checkpoint("llama-gqa"), folder)
    (folder / "generation_config.json").write_text(json.dumps(RECOMMENDED))
    return folder


def _llm(path, **options) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="4MiB", **options)


def test_saved_checkpoints_set_no_defaults(checkpoint):
    # save_pretrained writes generation_config.json without sampling keys: transformers'
    # class defaults (top_k 50) must not turn into defaults.
    llm = _llm(checkpoint("llama-gqa"))
    assert llm.generation_defaults == {}
    assert llm.get_default_sampling_params() == SamplingParams()


def test_the_checkpoints_values_are_the_defaults(model_dir, caplog):
    with caplog.at_level("INFO", logger="kvflow"):
        llm = _llm(model_dir)
    assert llm.generation_defaults == AS_PARAMS
    assert llm.get_default_sampling_params() == SamplingParams(**AS_PARAMS)
    assert "temperature=0.0, top_p=0.8, top_k=20" in caplog.text
    # generate() without sampling_params uses them: greedy, 6 tokens.
    prompt = {"prompt_token_ids": [5, 6, 7]}
    default, = llm.generate(prompt, use_tqdm=False)
    greedy, = llm.generate(prompt, SamplingParams(**{**AS_PARAMS, "temperature": 0}),
                           use_tqdm=False)
    assert default.outputs[0].token_ids == greedy.outputs[0].token_ids
    assert len(default.outputs[0].token_ids) <= 6


def test_vllm_ignores_the_file_and_the_override_goes_on_top(model_dir):
    assert load_generation_defaults("vllm", model_dir, {}) == {}
    assert _llm(model_dir, generation_config="vllm").get_default_sampling_params() == \
        SamplingParams()
    overridden = _llm(model_dir, override_generation_config='{"temperature": 0.7}')
    assert overridden.get_default_sampling_params() == SamplingParams(
        **{**AS_PARAMS, "temperature": 0.7})
    assert load_generation_defaults("vllm", model_dir, {"max_new_tokens": 9}) == \
        {"max_tokens": 9}


def test_a_folder_of_its_own(model_dir, checkpoint, tmp_path):
    plain = checkpoint("llama-gqa")
    assert load_generation_defaults(str(model_dir), plain, {}) == AS_PARAMS
    with pytest.raises(ValueError, match="no generation_config.json"):
        load_generation_defaults(str(tmp_path), plain, {})


@pytest.mark.parametrize("written, message", [
    ({"top_p": 2.0}, "top_p must be in"),
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"temperature": "hot"}, "temperature must be a number"),
])
def test_values_sampling_refuses_stop_the_start(tmp_path, written, message):
    (tmp_path / "generation_config.json").write_text(json.dumps(written))
    with pytest.raises(ValueError, match=message):
        load_generation_defaults("auto", tmp_path, {})


@pytest.mark.parametrize("override, message", [
    ('{"temp": 1}', "temp not supported"),
    ("[1]", "must be a JSON object"),
    ("{", "not valid JSON"),
])
def test_bad_overrides_are_refused(checkpoint, override, message):
    with pytest.raises(ValueError, match=message):
        _llm(checkpoint("llama-gqa"), override_generation_config=override)


def test_kvflow_generate_takes_the_models_defaults_under_its_flags(model_dir, capsys):
    from kvflow.cli import main

    flags = ["generate", str(model_dir), "--prompt", "class", "--dtype", "float32",
             "--device", "cpu", "--kv-cache-memory", "4MiB", "--ignore-eos"]
    llm = _llm(model_dir)

    def expected(**params) -> str:
        return llm.generate("class", SamplingParams(ignore_eos=True, **params),
                            use_tqdm=False)[0].outputs[0].text

    assert main(flags) == 0  # the file's greedy 6 tokens, top_k 20 and the rest
    assert capsys.readouterr().out == expected(**AS_PARAMS) + "\n"
    assert main([*flags, "--max-tokens", "3", "--top-k", "0"]) == 0
    assert capsys.readouterr().out == expected(**{**AS_PARAMS, "max_tokens": 3,
                                                  "top_k": 0}) + "\n"
    assert main([*flags, "--generation-config", "vllm"]) == 0  # the command's own: greedy 64
    assert capsys.readouterr().out == expected(temperature=0, max_tokens=64) + "\n"
