"""Tool-call parsing on text: the hermes format, the forced-call formats, and streams
(deltas of every prefix) that reassemble to the whole message."""
from __future__ import annotations

import json

import pytest

from kvflow.server.chat_message import MessageDeltas, MessageParser
from kvflow.server.tool_calls import NamedCallParser, RequiredCallsParser
from kvflow.server.tool_parsers import ParsedCall, ToolParse, get_tool_parser, tool_parser_names

HERMES = get_tool_parser("hermes")
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET", "24h": true}}\n</tool_call>'


def test_hermes_is_registered():
    assert "hermes" in tool_parser_names()
    with pytest.raises(ValueError, match="not one of"):
        get_tool_parser("nonesuch")


def test_several_calls_in_one_message():
    parsed = HERMES.parse(f"Let me look both up.\n{WEATHER}\n{TIME}", final=True)
    assert parsed.content == "Let me look both up."
    assert parsed.calls == (ParsedCall("get_weather", '{"city": "Paris"}'),
                            ParsedCall("get_time", '{"zone": "CET", "24h": true}'))
    only_calls = HERMES.parse(f"{WEATHER}\n{TIME}\n", final=True)
    assert only_calls.content is None and len(only_calls.calls) == 2


@pytest.mark.parametrize("text", [
    "Plain text, left alone.  \n",
    "if a <tool_call> b: print('not a call')",
    "<tool_call>not json</tool_call> and after",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    "ends with half a tag <tool_",
    "",
])
def test_text_that_is_not_a_call_is_left_alone(text):
    assert HERMES.parse(text, final=True).calls == ()
    assert HERMES.parse(text, final=True).content == text


def test_a_bad_block_beside_a_good_one_stays_content():
    parsed = HERMES.parse(f"<tool_call>oops</tool_call> {WEATHER}", final=True)
    assert parsed.content == "<tool_call>oops</tool_call>"
    assert [c.name for c in parsed.calls] == ["get_weather"]


def test_an_unterminated_last_call_counts_when_its_json_is_whole():
    parsed = HERMES.parse('<tool_call>{"name": "f", "arguments": {"x": 1}}', final=True)
    assert parsed.calls == (ParsedCall("f", '{"x": 1}'),)


def test_blocks_in_another_shape_are_read_once_they_close():
    # Keys in another order, or "parameters": a call once the block closes and parses.
    parsed = HERMES.parse('<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'
                          '<tool_call>{"name": "g", "parameters": {}}</tool_call>', final=True)
    assert parsed.calls == (ParsedCall("f", '{"x": 1}'), ParsedCall("g", "{}"))
    assert HERMES.parse('<tool_call>{"arguments": {"x": 1}, "na', final=False).calls == ()
    # A name with an escape JSON lacks is no call.
    bad = '<tool_call>{"name": "a\\q", "arguments": {}}</tool_call>'
    assert HERMES.parse(bad, final=True) == ToolParse(bad)


def test_a_call_cut_short_keeps_the_arguments_it_has():
    parsed = HERMES.parse('Sure. <tool_call>{"name": "f", "arguments": {"x": "ab', final=True)
    assert parsed == ToolParse("Sure.", (ParsedCall("f", '{"x": "ab'),))


def test_arguments_stream_as_they_are_written():
    parser = MessageParser(HERMES)
    text = f"Let me see. {WEATHER}"
    deltas = MessageDeltas()
    fragments = []
    for end in range(len(text) + 1):
        delta = deltas.next(parser.parse(text[:end], final=end == len(text)))
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["function"] == {"name": "get_weather", "arguments": "{"}
            fragments.append(call["function"]["arguments"])
    assert "".join(fragments) == '{"city": "Paris"}' and len(fragments) > 5


def test_arguments_given_as_text_are_kept_as_text():
    parsed = HERMES.parse('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',
                          final=True)
    assert parsed.calls == (ParsedCall("f", '{"x": 1}'),)


def _streamed(parser: MessageParser, text: str) -> dict:
    """The message a client rebuilds from the deltas of every prefix of `text`."""
    deltas = MessageDeltas()
    content, calls = "", []
    for end in range(len(text) + 1):
        delta = deltas.next(parser.parse(text[:end], final=end == len(text)))
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] == len(calls):
                assert set(call) == {"index", "id", "type", "function"}
                calls.append({"name": call["function"]["name"],
                              "arguments": call["function"]["arguments"]})
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {
                    "arguments"}
                calls[call["index"]]["arguments"] += call["function"]["arguments"]
    return {"content": content or None, "tool_calls": calls}


def _whole(parser: MessageParser, text: str) -> dict:
    body = parser.message_body(parser.parse(text, final=True), "assistant")
    return {"content": body["content"] or None,
            "tool_calls": [c["function"] for c in body.get("tool_calls", [])]}


@pytest.mark.parametrize("text", [
    f"Let me look both up.\n{WEATHER}\n{TIME}",
    f"{WEATHER}{TIME}  ",
    f"  \n{WEATHER}\nthen more text\n{TIME}\n",
    "Plain text with a < sign and <tool_ almost a tag",
    f"<tool_call>oops</tool_call>{WEATHER}<tool_call>{{\"name\": \"cut",
    f'{WEATHER}<tool_call>{{"name": "g", "arguments": {{"s": "a </tool_call> b"}}}}</tool_call>',
    '<tool_call>{"arguments": {"x": [1, 2]}, "name": "f"}</tool_call> after',
    '<tool_call>{"name": "f", "arguments": {"x": "cut sh',
    "   ",
])
@pytest.mark.parametrize("parallel", [True, False])
def test_hermes_streams_reassemble_to_the_message(text, parallel):
    parser = MessageParser(HERMES, parallel_tool_calls=parallel)
    assert _streamed(parser, text) == _whole(parser, text)
    if not parallel:
        assert len(_whole(parser, text)["tool_calls"]) <= 1


@pytest.mark.parametrize("text", [
    ('[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_time", "arguments": {}}]'),
    '[{"name": "get_weather", "arguments": {"city": "Pa',  # cut by max_tokens
    "",
])
def test_required_calls_stream_and_parse(text):
    parser = MessageParser(RequiredCallsParser())
    assert _streamed(parser, text) == _whole(parser, text)
    whole = _whole(parser, text)
    assert whole["content"] is None
    for call in whole["tool_calls"]:
        json.loads(call["arguments"])


def test_a_named_call_streams_its_arguments_as_they_come():
    parser = MessageParser(NamedCallParser("get_weather"))
    text = '{"city": "Paris", "days": 3}'
    assert _whole(parser, text) == {"content": None, "tool_calls": [
        {"name": "get_weather", "arguments": text}]}
    assert _streamed(parser, text) == _whole(parser, text)
    deltas = MessageDeltas()
    first = deltas.next(parser.parse("", final=False))
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert deltas.next(parser.parse('{"ci', final=False)) == {
        "tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}


def test_finish_reason_says_tool_calls_unless_cut():
    message = MessageParser(HERMES).parse(WEATHER, final=True)
    assert MessageParser.finish_reason(message, "stop") == "tool_calls"
    assert MessageParser.finish_reason(message, "length") == "length"
    plain = MessageParser(HERMES).parse("hello", final=True)
    assert MessageParser.finish_reason(plain, "stop") == "stop"


def test_over_deep_json_is_never_parsed():
    """Python's json fails past some hundreds of levels; a model's output may nest deeper."""
    deep = "[" * 2000 + "]" * 2000
    block = f"<tool_call>{deep}</tool_call>"
    assert HERMES.parse(block, final=True) == ToolParse(block)
    opening = '<tool_call>{"name": "f", "arguments": {"a": ' + deep + "}}</tool_call>"
    call = HERMES.parse(opening, final=True).calls[0]
    assert call.name == "f" and call.arguments == '{"a": ' + deep + "}}"  # never closes
    within = '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": ' + deep + "}]"
    assert RequiredCallsParser().parse(within, final=True).calls == (ParsedCall("f", '{"a": 1}'),)
    for parser, text in ((MessageParser(HERMES), opening),
                         (MessageParser(RequiredCallsParser()), within)):
        assert _streamed(parser, text) == _whole(parser, text)


def test_an_anthropic_tool_use_with_over_deep_arguments_has_no_input():
    from kvflow.server.anthropic import block
    from kvflow.server.output_items import OutputItem

    deep = '{"a": ' + "[" * 2000 + "]" * 2000 + "}"
    assert block(OutputItem("call", 0, deep, "c", "f"))["input"] == {}
    assert block(OutputItem("call", 0, '{"a": [[1]]}', "c", "f"))["input"] == {"a": [[1]]}
