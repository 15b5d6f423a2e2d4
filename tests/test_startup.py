"""Start-up: what a restart skips (the resolved config, AutoTokenizer's choice), and that
what it loads instead is what transformers would have given."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer, MixtralConfig

from checkpoints import VARIANTS
from kvflow.demo import demo_model_path
from kvflow.models.config import ModelConfig
from kvflow.models.hf_config import load_hf_config
from kvflow.tokenizer.loader import load_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KVFLOW_CACHE", str(root))
    return root


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_restart_reads_the_config_transformers_resolved(variant, checkpoint, cache):
    path = checkpoint(variant)
    first = ModelConfig.from_pretrained(path)  # resolved by transformers, then kept
    assert len(list((cache / "configs").iterdir())) == 1
    assert ModelConfig.from_pretrained(path) == first
    resolved, rebuilt = AutoConfig.from_pretrained(path), load_hf_config(path)
    assert type(rebuilt) is not type(resolved)  # the family's class was not needed
    assert rebuilt.to_dict() == resolved.to_dict()
    for name in resolved.to_dict():
        assert getattr(rebuilt, name) == getattr(resolved, name), name


def test_a_rebuilt_config_answers_the_class_aliases(tmp_path, cache):
    MixtralConfig(num_local_experts=6, num_hidden_layers=1).save_pretrained(tmp_path)
    load_hf_config(tmp_path)
    rebuilt = load_hf_config(tmp_path)
    assert type(rebuilt) is not MixtralConfig
    assert rebuilt.num_experts == rebuilt.num_local_experts == 6


def test_a_changed_config_is_resolved_again(checkpoint, tmp_path, cache):
    path = tmp_path / "model"
    path.mkdir()
    source = Path(checkpoint("llama-gqa"))
    for file in source.iterdir():
        (path / file.name).symlink_to(file)
    assert load_hf_config(path).rms_norm_eps == 1e-6
    config = json.loads((source / "config.json").read_text())
    (path / "config.json").unlink()
    (path / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert load_hf_config(path).rms_norm_eps == 1e-5
    assert load_hf_config(path).rms_norm_eps == 1e-5


def test_a_damaged_entry_is_resolved_again(checkpoint, cache, caplog):
    path = checkpoint("qwen3")
    load_hf_config(path)
    [entry] = (cache / "configs").iterdir()
    entry.write_text("{")
    assert load_hf_config(path).head_dim == 32
    assert "ignoring" in caplog.text
    assert json.loads(entry.read_text())["class"] == "Qwen3Config"


# The demo's tokenizer is a generic class, kept; the qwen2 checkpoint's is Qwen2Tokenizer,
# which AutoTokenizer picks from the model type on every start.
@pytest.mark.parametrize(("model", "kept"), [("demo", True), ("qwen2", False)])
def test_a_restart_loads_the_tokenizer_autotokenizer_chose(model, kept, checkpoint, cache):
    path = demo_model_path() if model == "demo" else Path(checkpoint(model))
    chosen = AutoTokenizer.from_pretrained(path)
    first, again = load_tokenizer(path), load_tokenizer(path)
    assert (cache / "tokenizers").exists() == kept
    text = "<|endoftext|>def f(x):\n    return x  # é 数"
    for tokenizer in (first, again):
        assert type(tokenizer) is type(chosen)
        assert tokenizer(text)["input_ids"] == chosen(text)["input_ids"]
        assert tokenizer.decode(chosen(text)["input_ids"]) == chosen.decode(
            chosen(text)["input_ids"])
        assert tokenizer.eos_token_id == chosen.eos_token_id
        assert tokenizer.all_special_ids == chosen.all_special_ids
        assert tokenizer.chat_template == chosen.chat_template


def test_a_restart_imports_no_model_package_of_transformers(checkpoint, cache):
    """`import kvflow` leaves torch for later, and with the cache warm neither the config
    nor the tokenizer imports transformers' model packages (a second of every start)."""
    paths = [str(demo_model_path()), str(checkpoint("llama-gqa"))]
    script = (
        "import sys, kvflow.cli\n"
        "assert 'torch' not in sys.modules, 'import kvflow.cli imported torch'\n"
        "from kvflow.models.config import ModelConfig\n"
        "from kvflow.tokenizer.loader import load_tokenizer\n"
        f"for path in {paths!r}:\n"
        "    ModelConfig.from_pretrained(path)\n"
        "    load_tokenizer(path)\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers.models')))\n"
    )
    env = {**os.environ, "KVFLOW_CACHE": str(cache)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "configuration_llama" in runs[0].stdout  # the first start resolved them
    assert runs[1].stdout.strip() == "[]"


def test_a_restart_loads_the_tokenizer_built_from_a_gguf_file(gguf_file, tmp_path, cache):
    from kvflow.models.gguf.tokenizer import load_gguf_tokenizer

    source, _ = gguf_file("llama-gqa", "F16")
    path = tmp_path / "model.gguf"
    path.write_bytes(source.read_bytes())
    built = load_gguf_tokenizer(path)
    first, again = load_tokenizer(path), load_tokenizer(path)
    [saved] = (cache / "tokenizers").iterdir()
    text = "<|user|>def f(x):\n    return x  # é 数<|end|>"
    for tokenizer in (first, again):
        assert type(tokenizer) is type(built)
        assert tokenizer(text)["input_ids"] == built(text)["input_ids"]
        assert tokenizer.decode(built(text)["input_ids"]) == built.decode(built(text)["input_ids"])
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (built.bos_token_id,
                                                                     built.eos_token_id)
        assert tokenizer.all_special_ids == built.all_special_ids
        assert tokenizer.chat_template == built.chat_template
    # A file written again is a new file: its tokenizer is built again.
    os.utime(path, ns=(0, 0))
    load_tokenizer(path)
    assert len(list((cache / "tokenizers").iterdir())) == 2
    assert saved.exists()
