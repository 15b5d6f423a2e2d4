"""Reasoning: <think> blocks split into reasoning_content (qwen3, deepseek_r1), streams that
reassemble to the whole message, and structured output that starts after the reasoning."""
from __future__ import annotations

import json

import pytest

from kvflow.sampling_params import StructuredOutputsParams
from kvflow.server.chat_message import MessageDeltas, MessageParser
from kvflow.server.reasoning_parsers import get_reasoning_parser, reasoning_parser_names
from kvflow.server.tool_parsers import get_tool_parser
from kvflow.structured_output.compiler import GrammarCompiler
from kvflow.structured_output.reasoning import AfterReasoning

QWEN3 = get_reasoning_parser("qwen3")
R1 = get_reasoning_parser("deepseek_r1")
CALL = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'


def test_both_formats_are_registered():
    assert {"qwen3", "deepseek_r1"} <= set(reasoning_parser_names())
    with pytest.raises(ValueError, match="not one of"):
        get_reasoning_parser("nonesuch")


@pytest.mark.parametrize("text, qwen3, deepseek_r1", [
    ("<think>\nweigh it\n</think>\n\nThe answer.", ("\nweigh it\n", "The answer."),
     ("\nweigh it\n", "The answer.")),
    # Thinking off (Qwen3's template closed the block in the prompt): all answer.
    ("The answer.", (None, "The answer."), ("The answer.", None)),
    # R1's template opened the block: the output starts inside it.
    ("weigh it</think>The answer.", (None, "weigh it</think>The answer."),
     ("weigh it", "The answer.")),
    ("<think>still thinking", ("still thinking", None), ("still thinking", None)),
    ("<think>done</think>", ("done", ""), ("done", "")),
])
def test_split(text, qwen3, deepseek_r1):
    assert QWEN3.split(text, final=True) == qwen3
    assert R1.split(text, final=True) == deepseek_r1


def _streamed(parser: MessageParser, text: str) -> dict:
    deltas = MessageDeltas()
    message = {"reasoning_content": "", "content": "", "calls": []}
    for end in range(len(text) + 1):
        delta = deltas.next(parser.parse(text[:end], final=end == len(text)))
        message["reasoning_content"] += delta.get("reasoning_content", "")
        message["content"] += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] == len(message["calls"]):
                message["calls"].append(dict(call["function"]))
            else:
                message["calls"][call["index"]]["arguments"] += call["function"]["arguments"]
    return {key: value or None for key, value in message.items()}


def _whole(parser: MessageParser, text: str) -> dict:
    body = parser.message_body(parser.parse(text, final=True), "assistant")
    return {"reasoning_content": body["reasoning_content"], "content": body["content"],
            "calls": [c["function"] for c in body.get("tool_calls", [])] or None}


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("tools", [False, True])
@pytest.mark.parametrize("text", [
    "<think>\nweigh it </thin k\n</think>\n\nThe answer.",
    f"<think>should I call?</think>\n{CALL}",
    f"plan</think>Calling. {CALL}",
    "The answer, with no thinking.",
    "<think>never closed",
    "<thi",
    "",
])
def test_streams_reassemble_to_the_message(name, tools, text):
    parser = MessageParser(get_tool_parser("hermes") if tools else None,
                           reasoning=get_reasoning_parser(name))
    assert _streamed(parser, text) == _whole(parser, text)


def test_calls_in_the_reasoning_are_not_calls():
    parser = MessageParser(get_tool_parser("hermes"), reasoning=QWEN3)
    message = parser.parse(f"<think>maybe {CALL}?</think>No call needed.", final=True)
    assert message.tool_calls == () and message.content == "No call needed."
    message = parser.parse(f"<think>yes</think>{CALL}", final=True)
    assert [c.name for c in message.tool_calls] == ["f"] and message.content is None


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture(scope="module")
def compiler(checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint("llama-gqa"))
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def _follows(compiler: GrammarCompiler, params: StructuredOutputsParams, text: str) -> str:
    """"complete", "partial" or "refused": how the constraint takes `text`."""
    grammar = compiler.compile(params).matcher()
    if not grammar.accept(compiler._hf_tokenizer.encode(text, add_special_tokens=False)):
        return "refused"
    return "complete" if grammar.is_terminated else "partial"


@pytest.mark.parametrize("name, text, expected", [
    ("deepseek_r1", 'free {"n": "text" </think>\n\n{"n": 3}', "complete"),
    ("deepseek_r1", '<think>x</think>{"n": 3}', "complete"),
    ("deepseek_r1", '{"n": 3}', "partial"),  # still reasoning: no </think> yet
    ("deepseek_r1", 'x</think>not json', "refused"),
    ("qwen3", '<think>x {"n": "a"}</think>\n{"n": 3}', "complete"),
    ("qwen3", '{"n": 3}', "complete"),  # thinking off: no block
    ("qwen3", 'free text</think>{"n": 3}', "refused"),  # no block opened
    ("qwen3", ' {"n": 3}', "refused"),  # whitespace only after a block
])
def test_structured_output_starts_after_the_reasoning(compiler, name, text, expected):
    parser = get_reasoning_parser(name)
    params = AfterReasoning.wrap(StructuredOutputsParams(json=SCHEMA),
                                 None if parser.starts_inside else parser.start, parser.end)
    assert _follows(compiler, params, text) == expected
    if expected == "complete":
        assert json.loads(parser.split(text, final=True)[1]) == {"n": 3}


@pytest.mark.parametrize("constraint", [{"regex": "[ab]{2}"}, {"choice": ["yes", "no"]},
                                        {"grammar": 'start: "x" "y"'}, {"json_object": True}])
def test_every_kind_of_constraint_follows_reasoning(compiler, constraint):
    params = AfterReasoning.wrap(StructuredOutputsParams(**constraint), None, "</think>")
    answer = {"regex": "ab", "choice": "no", "grammar": "xy", "json_object": "{}"}
    assert _follows(compiler, params, f"hmm</think> {answer[next(iter(constraint))]}") == \
        "complete"
    # Compiled once per (constraint, tags): the plain constraint is another entry.
    assert compiler.compile(params) is compiler.compile(params)
    assert compiler.compile(StructuredOutputsParams(**constraint)) is not \
        compiler.compile(params)
