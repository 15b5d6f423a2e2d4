"""Nesting depth read without parsing (kvflow/json_depth.py), against the parser's own
reading of the same text."""
from __future__ import annotations

import json

import pytest

from kvflow.json_depth import (MAX_JSON_DEPTH, TooDeepError, json_depth, loads, too_deep,
                               within_json_depth)


def _parsed_depth(value) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return 1 + max(map(_parsed_depth, value), default=0)
    return 0


@pytest.mark.parametrize("text", [
    "[]", "{}", "1", '"[[["', '[[["]]]"]]]', '[["\\"[[["]]', '[["\\\\"],[[]]]',
    '{"a":"\\\\\\"[["}', '["\\\\\\\\\\\\\\\\"]', '  {"a": [[1]]}', '[{"k[": "}"}, [[]]]',
    '["é[", {"ü": [["x"]]}]',
])
def test_depth_is_the_parsers(text):
    assert json_depth(text) == _parsed_depth(json.loads(text))
    assert json_depth(text.encode()) == json_depth(text.encode("utf-16")) == json_depth(text)


def test_only_the_first_value_counts_and_a_cut_one_as_far_as_it_goes():
    assert json_depth('{"a": [1]} [[[[[[') == 2  # a parser stops after the first value
    assert json_depth('"x" [[[[') == 0
    assert json_depth('[{"a": [[') == 4


def test_loads_refuses_past_the_limit_before_parsing():
    at = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert within_json_depth(at) and _parsed_depth(loads(at)) == MAX_JSON_DEPTH
    past = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError
    assert not within_json_depth(past)
    with pytest.raises(TooDeepError, match="nests 100,000 levels"):
        loads(past)


def test_a_body_past_the_limit_names_its_top_level_field():
    deep = "[" * 300 + "]" * 300
    body = ('{"model": "m", "stop": ["]]", "{{"], "messages": [{"role": "user", '
            f'"content": "[[[\\"", "x": {deep}}}], "n": 1}}')
    assert too_deep(body.encode()) == (303, "messages")
    assert too_deep(body.encode("utf-16")) == (303, "messages")
    assert too_deep(f'{{"a": {deep[:250]}{deep[-250:]}}}'.encode()) is None
    assert too_deep(deep.encode()) == (300, None)  # no object: no field to name
