"""The shipped demo models: they load in kvflow and transformers alike, they score held-out
standard library code about as well as when they were trained, and they write Python."""
from __future__ import annotations

import ast

import pytest

from conftest import assert_greedy_matches, hf_greedy
from kvflow import LLM, SamplingParams
from kvflow.demo import demo_draft_path, demo_model_path, heldout_token_ids, score_heldout

# Held-out perplexity measured after training (scripts/eval_demo_model.py, 20,480 tokens):
# see README. The bounds leave room for other Pythons' files; a broken loader or
# tokenizer scores in the hundreds or thousands.
PERPLEXITY_BOUND = {"demo": 90.0, "demo-draft": 180.0}  # shipped: 81.8 and 158.7
HELDOUT_TOKENS = 20480
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def", "import os\nimport sys\n\n",
           "for i in range(10):\n", "    return self."]
MODELS = {"demo": demo_model_path, "demo-draft": demo_draft_path}


@pytest.fixture(scope="module", params=sorted(MODELS))
def demo(request):
    return request.param, MODELS[request.param]()


def test_ships_bf16_under_40_mb():
    total = sum(f.stat().st_size for d in MODELS.values() for f in d().iterdir())
    assert total <= 40 * 2**20
    for path in MODELS.values():
        assert '"bfloat16"' in (path() / "config.json").read_text()


def test_greedy_tokens_match_transformers(demo, hf_model):
    _, path = demo
    llm = LLM(str(path), dtype="float32", kv_cache_memory="64MiB")
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    reference = hf_model(path)
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        assert output.prompt_token_ids == ids
        assert_greedy_matches([output.outputs[0].token_ids], [hf_greedy(reference, ids, 24)],
                              24)


def test_heldout_perplexity_is_what_training_reached(demo):
    name, path = demo
    llm = LLM(str(path), kv_cache_memory="256MiB")
    ids = heldout_token_ids(llm.get_tokenizer(), HELDOUT_TOKENS, path)
    assert len(ids) == HELDOUT_TOKENS
    perplexity, greedy = score_heldout(llm, ids)
    assert len(greedy) == HELDOUT_TOKENS - HELDOUT_TOKENS // 1024
    assert perplexity < PERPLEXITY_BOUND[name], perplexity


def test_default_model_completes_valid_python():
    llm = LLM(kv_cache_memory="64MiB")
    assert llm.get_tokenizer().name_or_path == str(demo_model_path())
    prompt = "def fibonacci(n):"
    text = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=48),
                        use_tqdm=False)[0].outputs[0].text
    lines = (prompt + text).splitlines()

    def parses(k: int) -> bool:
        try:
            ast.parse("\n".join(lines[:k]))
        except SyntaxError:
            return False
        return True

    # The def line alone is not a statement; with its first body line(s) it is.
    assert any(parses(k) for k in range(2, len(lines) + 1)), prompt + text


def test_chat_template_ships_with_the_tokenizer():
    llm = LLM(kv_cache_memory="16MiB")
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2),
                    use_tqdm=False)
    assert chat[0].prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
