from __future__ import annotations

import hashlib

from kvflow import LLM, SamplingParams
from kvflow.demo import ensure_demo_model


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_model_is_deterministic_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path / "cache"))
    first = ensure_demo_model()
    assert first.parent == tmp_path / "cache"
    again = ensure_demo_model(tmp_path / "second")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(first / name) == _digest(again / name)
    assert ensure_demo_model() == first  # cached: not rebuilt
    llm = LLM(str(first), kv_cache_memory="16MiB")
    out = llm.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=8,
                                                            ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2),
                    use_tqdm=False)
    assert chat[0].prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
