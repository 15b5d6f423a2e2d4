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


def test_several_tokens_in_one_step_stop_at_a_stop_string_inside_them(tokenizer):
    """A step that adds several tokens (accepted drafts) is read token by token: the text is
    cut at a stop string inside the run and the tokens after it are dropped, with their
    logprobs."""
    from kvflow.engine.output_processor import OutputProcessor, ParentState
    from kvflow.outputs import CompletionOutput, RequestMetrics, RunnerOutput, TokenLogprobs
    from kvflow.request import Request
    from kvflow.sampling_params import SamplingParams

    ids = tokenizer.encode("alpha beta gamma delta")
    params = SamplingParams(stop=["beta"], logprobs=0, max_tokens=20)
    request = Request(request_id="r", prompt_token_ids=[5], sampling_params=params,
                      max_tokens=20, stop_token_ids=frozenset(), arrival_time=0.0)
    parent = ParentState(request_id="r", prompt=None, prompt_token_ids=[5],
                         prompt_logprobs=None,
                         outputs=[CompletionOutput(0, "", [], None, None)], child_ids=["r"],
                         num_unfinished=1, metrics=RequestMetrics(arrival_time=0.0))
    processor = OutputProcessor(tokenizer)
    processor.add(parent, [request])
    for token_id in ids:
        request.append_output_token(token_id)
    entries = [TokenLogprobs([t], [-0.5], [1]) for t in ids]
    outputs, stopped = processor.process(
        RunnerOutput(sampled_token_ids={"r": ids}, logprobs={"r": entries}),
        [(request, len(ids))])
    output = outputs[0].outputs[0]
    assert stopped == ["r"] and output.finish_reason == "stop" and output.stop_reason == "beta"
    assert output.text == "alpha "
    kept = output.token_ids
    assert 0 < len(kept) < len(ids) and ids[:len(kept)] == kept
    assert "beta" in tokenizer.decode(kept) and "gamma" not in tokenizer.decode(kept)
    assert len(output.logprobs) == len(kept) and output.cumulative_logprob == -0.5 * len(kept)
