from __future__ import annotations

import pytest

from checkpoints import build_tokenizer
from kvflow.tokenizer.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_multibyte_characters_split_across_tokens(tokenizer):
    text = "héllo 世界 🙂 naïve"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode()) // 2  # byte-level: multi-byte characters span tokens
    detok = IncrementalDetokenizer(tokenizer, [5, 6], skip_special_tokens=True, stop=(),
                                   include_stop_str_in_output=False)
    pieces = []
    for token_id in ids:
        before = detok.text
        detok.update([token_id], check_stop=True)
        pieces.append(detok.text[len(before):])
        assert "\ufffd" not in detok.text
    assert detok.text == text
    assert "".join(pieces) == text


def test_stop_string_spanning_tokens(tokenizer):
    text = "def fibonacci(n):\n    return n"
    ids = tokenizer.encode(text)
    stop = "acci(n"
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=(stop, "zzz"),
                                   include_stop_str_in_output=False)
    hit = None
    for token_id in ids:
        hit = detok.update([token_id], check_stop=True)
        if hit:
            break
    assert hit == stop
    assert detok.text == "def fibon"
    assert all(stop not in tokenizer.decode([t]) for t in ids), "the stop must span tokens"


def test_special_tokens_skipped(tokenizer):
    eos = tokenizer.eos_token_id
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=(),
                                   include_stop_str_in_output=False)
    detok.update(tokenizer.encode("hello") + [eos], check_stop=False)
    assert detok.text == "hello"
