"""The server's chat controls, as agents use them: a chat template of the server's own
(--chat-template), chat_template_kwargs, continue_final_message and add_generation_prompt;
and the model's sampling defaults (generation_config.json) for what requests leave unset."""
from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
from checkpoints import TOOLS_CHAT_TEMPLATE
from server_process import ServerProcess

ENGINE_FLAGS = ("--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB")
HI = [{"role": "user", "content": "hi"}]
# The checkpoint's recommended sampling: greedy, top_k 5, 6 new tokens.
RECOMMENDED = {"temperature": 0, "top_k": 5, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recommended") / "model"
    shutil.copytree(checkpoint("qwen3"), folder)
    (folder / "generation_config.json").write_text(json.dumps(RECOMMENDED))
    return folder


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server-chat")
    template = folder / "tools.jinja"
    template.write_text(TOOLS_CHAT_TEMPLATE)
    process = ServerProcess(model_dir, *ENGINE_FLAGS, "--served-model-name", "tiny",
                            "--chat-template", str(template),
                            log=folder / "serve.log")
    process.wait_ready()
    yield process
    assert process.stop(), process.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _tokens(server, **body) -> list[int]:
    response = httpx.post(server.url + "/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_the_servers_template_and_its_kwargs(server, client, tokenizer):
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    assert _tokens(server, messages=HI) == encode("<|user|>hi<|end|><|assistant|>")
    assert _tokens(server, messages=HI, chat_template_kwargs={"enable_thinking": False}) == \
        encode("<|user|>hi<|end|><|assistant|><think>\n\n</think>\n\n")
    partial = [*HI, {"role": "assistant", "content": "Hello, I"}]
    assert _tokens(server, messages=partial, add_generation_prompt=False,
                   continue_final_message=True) == encode("<|user|>hi<|end|><|assistant|>Hello, I")
    chat = client.chat.completions.create(
        model="tiny", messages=partial, max_tokens=2, extra_body={
            "add_generation_prompt": False, "continue_final_message": True})
    assert chat.usage.prompt_tokens == len(encode("<|user|>hi<|end|><|assistant|>Hello, I"))
    chat = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert chat.usage.prompt_tokens == len(
        encode("<|user|>hi<|end|><|assistant|><think>\n\n</think>\n\n"))


@pytest.mark.parametrize("body, param, message", [
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs",
     "may not set tokenize"),
    ({"chat_template_kwargs": {"tools": [], "conversation": []}}, "chat_template_kwargs",
     "conversation, tools"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs", None),
    ({"chat_template_kwargs": {"x": "<|system|>"}}, "chat_template_kwargs", "special token"),
    ({"continue_final_message": True}, "continue_final_message", "cannot both be true"),
    ({"continue_final_message": True, "add_generation_prompt": False},
     "continue_final_message", "must be the assistant's"),
    ({"messages": [*HI, {"role": "assistant", "content": "a"}], "continue_final_message": True},
     "continue_final_message", "cannot both be true"),
    ({"chat_template": "{{ messages }}"}, "chat_template", "--chat-template"),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt", None),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_bad_chat_controls_get_400(server, path, body, param, message):
    response = httpx.post(server.url + path, json={"messages": HI, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if message is not None:
        assert message in error["message"]


def test_the_checkpoints_defaults_fill_what_requests_leave_unset(server, client, model_dir):
    from kvflow import LLM, SamplingParams

    assert "sampling defaults from " in server.log_path.read_text()
    prompt = "def fibonacci(n):"
    unset = client.completions.create(model="tiny", prompt=prompt,
                                      extra_body={"ignore_eos": True})
    greedy = client.completions.create(model="tiny", prompt=prompt, temperature=0,
                                       max_tokens=6, extra_body={"ignore_eos": True})
    assert unset.usage.completion_tokens == 6  # max_new_tokens, not the field's 16
    assert unset.choices[0].text == greedy.choices[0].text
    # A request's own values win; the defaults it leaves unset (top_k) still apply.
    offline = LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory="4MiB",
                  generation_config="vllm")
    for seed in range(3):
        sampled = client.completions.create(model="tiny", prompt=prompt, temperature=1.0,
                                            seed=seed, max_tokens=8,
                                            extra_body={"ignore_eos": True})
        expected = offline.generate(prompt, SamplingParams(temperature=1.0, top_k=5, seed=seed,
                                                           max_tokens=8, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].text
        assert sampled.choices[0].text == expected
    chat = client.chat.completions.create(model="tiny", messages=HI,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 6
    chat = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=3,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3
