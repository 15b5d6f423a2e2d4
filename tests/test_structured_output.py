"""Structured output: constraints, their compilation and cache, bitmasks, and generation that
always matches (JSON schemas, regular expressions, choices, grammars) on a random-weight
model and on the demo model."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from conftest import random_prompts
from kvflow import LLM, SamplingParams, StructuredOutputsParams
from kvflow.demo import demo_model_path
from kvflow.sampling_params import ParameterError
from kvflow.structured_output.bitmask import apply_token_bitmask, bitmask_width, compute_masks
from kvflow.structured_output.compiler import GrammarCompiler
from kvflow.structured_output.matcher import RequestGrammar

SCHEMAS = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
SUPPORTED = SCHEMAS["supported"]
PROMPTS = ["def config():\n    return ", "import json\nvalue = ", "data = ", "x = "]


def assert_valid(text: str, schema: dict) -> None:
    """Parses, and validates under the schema's draft (2020-12 by default), formats too."""
    validator = jsonschema.validators.validator_for(schema)
    validator(schema, format_checker=validator.FORMAT_CHECKER).validate(json.loads(text))


@pytest.fixture(scope="module")
def llm(checkpoint):
    # Batch-invariant: unconstrained requests' tokens alone and in a mixed batch are
    # compared exactly.
    return LLM(str(checkpoint("llama-gqa")), dtype="float32", device="cpu",
               kv_cache_memory="4MiB", batch_invariant=True)


@pytest.fixture(scope="module")
def compiler():
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def test_params_take_exactly_one_valid_constraint():
    assert StructuredOutputsParams(json='{"type": "integer"}').json == {"type": "integer"}
    assert StructuredOutputsParams(json={"b": 1, "a": 2}).spec == \
        StructuredOutputsParams(json={"a": 2, "b": 1}).spec
    for kwargs, message in [({}, "got none"), ({"regex": "a", "choice": ["a"]}, "regex, choice"),
                            ({"json": "{oops"}, "not valid JSON"), ({"json": [1]}, "schema"),
                            ({"choice": []}, "non-empty list"), ({"choice": ["a", 3]}, "list"),
                            ({"regex": ""}, "non-empty"), ({"grammar": " "}, "non-empty"),
                            ({"json_object": False}, "true")]:
        with pytest.raises(ParameterError, match=message) as caught:
            StructuredOutputsParams(**kwargs)
        assert caught.value.param == "structured_outputs"
    with pytest.raises(ParameterError, match="StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})  # type: ignore[arg-type]


def test_compiler_caches_each_distinct_constraint_within_its_bound(compiler):
    small = GrammarCompiler(compiler._hf_tokenizer, compiler.vocab_size, [0], max_cached=2)
    first = small.compile(StructuredOutputsParams(json={"type": "integer", "minimum": 0}))
    assert small.compile(StructuredOutputsParams(json={"minimum": 0, "type": "integer"})) is first
    small.compile(StructuredOutputsParams(regex="[a-z]+"))
    small.compile(StructuredOutputsParams(choice=["yes", "no"]))
    assert small.num_cached == 2
    assert small.compile(StructuredOutputsParams(json={"type": "integer", "minimum": 0})) \
        is not first  # evicted, least recently used
    with pytest.raises(ParameterError):
        small.compile(StructuredOutputsParams(regex="(unclosed"))
    assert small.num_cached == 2  # failures are not cached


@pytest.mark.parametrize("params,message", [
    (StructuredOutputsParams(regex="(unclosed"), "regular expression cannot be compiled"),
    (StructuredOutputsParams(grammar="root ::= ("), "grammar cannot be compiled"),
    (StructuredOutputsParams(json={"type": "strin"}), "Invalid type"),
    (StructuredOutputsParams(json={"$ref": "#/$defs/absent"}), "absent"),
    (StructuredOutputsParams(json={"type": "integer", "minimum": 5, "maximum": 2}),
     "Unsatisfiable"),
])
def test_constraints_that_cannot_compile_are_refused(compiler, params, message):
    with pytest.raises(ParameterError, match=message) as caught:
        compiler.compile(params)
    assert caught.value.param == "structured_outputs"


def _ref_chain(n: int) -> dict:
    defs = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(n)}
    defs[f"a{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/a0"}


def _rule_chain(n: int, define: str) -> str:
    rules = [f"r{i} {define} r{i + 1}" for i in range(n)] + [f'r{n} {define} "x"']
    return "\n".join([f"{'start' if define == ':' else 'root'} {define} r0", *rules])


@pytest.mark.parametrize("params,message", [
    # Each of these once overflowed llguidance's native stack (SIGSEGV).
    (StructuredOutputsParams(json=_ref_chain(1000)), "JSON schema nests 1,003 levels deep; "
                                                      "the limit is 128"),
    (StructuredOutputsParams(grammar=_rule_chain(3000, ":")), "grammar nests 3,002 levels"),
    (StructuredOutputsParams(grammar=_rule_chain(10000, "::=")), "grammar is 157,810 bytes; "
                                                                 "the limit is 65,536"),
    (StructuredOutputsParams(json={"enum": ["x" * 300_000]}), "JSON schema is 300,013 bytes; the limit is 262,144"),
    (StructuredOutputsParams(regex="a" * 20_000), "regular expression is 20,000 bytes"),
    (StructuredOutputsParams(choice=["y" * 70_000]), "choice list is 70,000 bytes"),
])
def test_constraints_past_the_limits_are_refused_naming_the_limit(compiler, params, message):
    with pytest.raises(ParameterError, match=message) as caught:
        compiler.compile(params)
    assert caught.value.param == "structured_outputs"


def test_depths_follow_refs_and_rules_and_stop_at_recursion():
    from kvflow.structured_output.limits import grammar_depth, schema_depth

    tree = {"$defs": {"node": {"type": "object", "properties": {
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}
    assert schema_depth(tree) == 6  # root, $defs, node, properties, children, items
    assert schema_depth(_ref_chain(50)) == 53
    deep: dict = {"type": "string"}
    for _ in range(5000):  # deeper than Python's recursion limit: the walk is iterative
        deep = {"items": deep}
    assert schema_depth(deep) == 5001
    arithmetic = ('start: expr\nexpr: term ("+" term)*  // a comment: term expr\n'
                  'term: factor ("*" factor)*\nfactor: NUMBER | "(" expr ")" | /[a-z]+/\n'
                  '%import common.NUMBER')
    assert grammar_depth(arithmetic) == 4
    assert grammar_depth(_rule_chain(10, "::=")) == 12


def test_constraints_at_the_size_limits_compile_without_exhausting_the_stack(tmp_path):
    """The depth checks give clear errors; the stack is what keeps the process alive. Rule
    and $ref chains as long as the size limits allow (depth checks bypassed) must compile
    on the compile thread's stack. In a subprocess: an overflow is a SIGSEGV."""
    import itertools
    import string
    import subprocess
    import sys

    from kvflow.structured_output.limits import MAX_GRAMMAR_BYTES, MAX_SCHEMA_BYTES

    def short_names():
        for length in itertools.count(1):
            for letters in itertools.product(string.ascii_lowercase, repeat=length):
                yield "".join(letters)

    def chain(line, limit: int) -> list[str]:
        names, lines, size = short_names(), [], 0
        name = next(names)
        while size < limit - 64:
            following = next(names)
            lines.append(line(name, following))
            size, name = size + len(lines[-1]) + 1, following
        return lines + [line(name, None)]

    lark = "start: a\n" + "\n".join(chain(lambda a, b: f"{a}:{b or chr(34) * 2}",
                                             MAX_GRAMMAR_BYTES))
    defs = dict(chain(lambda a, b: (a, {"$ref": f"#/$defs/{b}"} if b else {}),
                      MAX_SCHEMA_BYTES // 2))  # a $ref entry is ~2x its line's length
    schema = {"$defs": defs, "$ref": "#/$defs/a"}
    (tmp_path / "lark").write_text(lark)
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    script = f"""
import json, pathlib, llguidance, llguidance.hf
from transformers import AutoTokenizer
from kvflow.structured_output.limits import on_compile_stack
tokenizer = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained({str(demo_model_path())!r}))
folder = pathlib.Path({str(tmp_path)!r})
grammars = [llguidance.grammar_from("grammar", (folder / "lark").read_text()),
            llguidance.LLMatcher.grammar_from_json_schema(
                json.loads((folder / "schema.json").read_text()))]
for grammar in grammars:
    matcher = on_compile_stack(lambda: llguidance.LLMatcher(tokenizer, grammar, log_level=0))
    assert not matcher.is_error(), matcher.get_error()
print("compiled", len(grammars))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled 2" in done.stdout, done.stderr[-2000:]
    assert len(lark) <= MAX_GRAMMAR_BYTES and len(defs) > 4000  # chains far past 8 MiB's


@pytest.mark.parametrize("entry", SCHEMAS["unsupported"], ids=lambda e: e["name"])
def test_unsupported_schema_features_are_refused_up_front(llm, entry):
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=entry["schema"]))
    with pytest.raises(ParameterError, match=re.escape(entry["feature"])):
        llm.llm_engine.add_request("refused", "x = ", params)
    assert not llm.llm_engine.has_unfinished_requests()


def test_masks_at_draft_positions_match_step_by_step_and_leave_the_matcher(compiler):
    import llguidance

    tokenizer = compiler._hf_tokenizer
    compiled = compiler.compile(StructuredOutputsParams(json=SUPPORTED[0]["schema"]))
    vocab = compiler.vocab_size
    drafts = tokenizer.encode('{"name": "ab')
    grammar = compiled.matcher()
    before = compute_masks(grammar, [], vocab)
    at_drafts = compute_masks(grammar, drafts, vocab)
    assert torch.equal(compute_masks(grammar, [], vocab), before)  # rolled back
    assert grammar.position == 0
    stepwise = compiled.matcher()
    for row, token in enumerate(drafts):
        assert torch.equal(at_drafts[row], compute_masks(stepwise, [], vocab)[0])
        assert stepwise.accept([token])
    assert torch.equal(at_drafts[len(drafts)], compute_masks(stepwise, [], vocab)[0])
    stepwise.rollback(len(drafts))
    assert torch.equal(compute_masks(stepwise, [], vocab), before)
    # As llguidance's own executor writes them, past a refused draft too (rows left open).
    refused = drafts[:3] + tokenizer.encode("]]") + drafts[3:]
    expected = torch.full((1 + len(refused), bitmask_width(vocab)), -1, dtype=torch.int32)
    llguidance.LLExecutor().unsafe_compute_mask_ptr_with_draft_token(
        [(grammar.matcher, 0, refused)], expected.data_ptr(), expected.shape[1] * 4,
        len(expected))
    assert torch.equal(compute_masks(grammar, refused, vocab), expected)
    assert (expected[5:] == -1).all() and not (expected[3] == -1).all()


def test_apply_token_bitmask_masks_only_constrained_rows():
    vocab = 77  # not a multiple of 32
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=generator)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, bitmask_width(vocab)), dtype=torch.int32,
                            generator=generator)
    masked = apply_token_bitmask(logits, bitmask, torch.tensor([1, 3]))
    for row, mask_row in ((1, 0), (3, 1)):
        for token in range(vocab):
            allowed = (int(bitmask[mask_row, token // 32]) >> (token % 32)) & 1
            assert masked[row, token] == (logits[row, token] if allowed else -float("inf"))
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])


def _generate_schemas(llm: LLM, max_tokens: int) -> None:
    params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=i,
                             structured_outputs=StructuredOutputsParams(json=e["schema"]))
              for i, e in enumerate(SUPPORTED)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(SUPPORTED))]
    for entry, output in zip(SUPPORTED, llm.generate(prompts, params, use_tqdm=False)):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", (entry["name"], completion.text)
        assert completion.stop_reason is None
        assert_valid(completion.text, entry["schema"])


def test_every_schema_output_validates_random_model(llm):
    assert len(SUPPORTED) >= 50
    _generate_schemas(llm, max_tokens=160)


def test_every_schema_output_validates_demo_model():
    _generate_schemas(LLM(device="cpu", kv_cache_memory="64MiB"), max_tokens=96)


# [0-9], not \d: llguidance's \d takes every Unicode decimal digit of a newer Unicode
# than Python 3.11's re knows (U+1E5F7, an Ol Onal digit, is one and not the other).
@pytest.mark.parametrize("pattern", [r"[a-z]{3,8}", r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)",
                                     r"[A-Z][a-z]{1,5} [0-9]{1,3}", r"0x[0-9a-f]{2,6}"])
def test_regex_outputs_match_fully(llm, pattern):
    params = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=32,
                            structured_outputs=StructuredOutputsParams(regex=pattern))
    for completion in llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs:
        assert re.fullmatch(pattern, completion.text), completion.text


def test_choice_and_grammar_outputs_match_fully(llm):
    choices = ["red", "green", "blue", "dark blue"]
    lark = 'start: "let " NAME " = " NUM\nNAME: /[a-z]{1,6}/\nNUM: /[0-9]{1,4}/'
    gbnf = 'root ::= "(" num ("," num)? ")"\nnum ::= [0-9] [0-9]?'
    cases = [(StructuredOutputsParams(choice=choices), "|".join(map(re.escape, choices))),
             (StructuredOutputsParams(grammar=lark), r"let [a-z]{1,6} = [0-9]{1,4}"),
             (StructuredOutputsParams(grammar=gbnf), r"\([0-9]{1,2}(,[0-9]{1,2})?\)")]
    for params, pattern in cases:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=3, max_tokens=24,
                                                       structured_outputs=params),
                               use_tqdm=False)
        for output in outputs:
            assert re.fullmatch(pattern, output.outputs[0].text), output.outputs[0].text
            assert output.outputs[0].finish_reason == "stop"


def test_mixed_batch_gives_unconstrained_requests_their_own_tokens(llm):
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, seed=7)]
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompts, plain, use_tqdm=False)
    constrained = [SamplingParams(temperature=0, max_tokens=40,
                                  structured_outputs=StructuredOutputsParams(json=e["schema"]))
                   for e in SUPPORTED[:4]]
    mixed = llm.generate(prompts + PROMPTS, [plain] * 4 + constrained, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == [o.outputs[0].token_ids for o in alone]
    for entry, output in zip(SUPPORTED, mixed[4:]):
        assert_valid(output.outputs[0].text, entry["schema"])


def test_n_samples_seeds_and_raw_logprobs(llm):
    schema = SUPPORTED[0]["schema"]
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=60, logprobs=2,
                            structured_outputs=StructuredOutputsParams(json=schema))
    first = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs
    again = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({c.text for c in first}) > 1  # each sample follows its own matcher
    for completion in first:
        assert_valid(completion.text, schema)
    # Logprobs are the model's own distribution, before the grammar's mask: the top entry
    # at the first position is the unconstrained greedy token, allowed or not.
    free = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=1, logprobs=2),
                        use_tqdm=False)[0].outputs[0]
    top = next(t for t, lp in first[0].logprobs[0].items() if lp.rank == 1)
    assert top == free.token_ids[0]
    assert first[0].logprobs[0][top].logprob == pytest.approx(
        free.logprobs[0][top].logprob, abs=1e-5)


def _slow_masks(monkeypatch, seconds: float, when) -> None:
    """Every mask computation for which when(grammar, drafts) holds sleeps first (the GIL
    released, as llguidance's own computation releases it)."""
    fill = RequestGrammar.fill_masks

    def slow(grammar, pointer, row_bytes, draft_token_ids):
        if when(grammar, draft_token_ids):
            time.sleep(seconds)
        fill(grammar, pointer, row_bytes, draft_token_ids)

    monkeypatch.setattr(RequestGrammar, "fill_masks", slow)


@pytest.mark.parametrize("slow", [False, True], ids=["masks-in-time", "masks-late"])
def test_preempted_requests_keep_their_matchers(checkpoint, llm, monkeypatch, slow):
    """Also when masks come late (every third position's takes 10 ms, past the step's
    wait): a deferred request is passed over, preempted and recomputed with the rest, and
    gives the tokens it gives with its masks in time."""
    schemas = [e["schema"] for e in SUPPORTED[:12]]
    # Text prompts: random ids can end inside a UTF-8 character that the output then completes.
    prompts = [f"# record {i}\n" + "value = compute(a, b)\n" + PROMPTS[i % len(PROMPTS)]
               for i in range(len(schemas))]
    params = [SamplingParams(temperature=0, max_tokens=60,
                             structured_outputs=StructuredOutputsParams(json=s))
              for s in schemas]
    roomy = llm.generate(prompts, params, use_tqdm=False)
    if slow:
        _slow_masks(monkeypatch, 0.01, lambda grammar, drafts: grammar.position % 3 == 0)
    small = LLM(str(checkpoint("llama-gqa")), dtype="float32", device="cpu",
                kv_cache_memory=10 * 16 * 512)  # 10 blocks of 16 tokens
    tight = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions_total > 0
    assert [o.outputs[0].text for o in tight] == [o.outputs[0].text for o in roomy]
    for schema, output in zip(schemas, tight):
        assert_valid(output.outputs[0].text, schema)


def test_stop_strings_max_tokens_and_conflicts(llm):
    schema = SUPPORTED[0]["schema"]  # {"name": ..., "age": ...}
    constraint = StructuredOutputsParams(json=schema)
    cut = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3,
                                                  structured_outputs=constraint),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "length" and '{"name": "'.startswith(cut.text[:10])
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=80, stop=['",'],
                                                      structured_outputs=constraint),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == '",'
    assert stopped.text.startswith('{"name": "') and '",' not in stopped.text
    # Nothing the grammar allows is left (only EOS may be sampled): the request is aborted,
    # not finished with output that cannot match.
    conflict = llm.generate(PROMPTS[0], SamplingParams(
        temperature=0, max_tokens=8, allowed_token_ids=[0],
        structured_outputs=constraint), use_tqdm=False)[0].outputs[0]
    assert conflict.finish_reason == "abort"


def test_slow_masks_hold_back_only_their_own_request(llm, monkeypatch):
    """The first mask of a wide anyOf schema cost 0.35 s per sequence on the engine thread,
    and a request with n=64 froze every other stream for 24 s. Here each constrained
    sequence's first mask takes 3 s: the plain request beside them streams all its tokens,
    one a step, before any constrained sequence samples its first, and the constrained
    ones still finish with valid output."""
    slow_s = 3.0
    _slow_masks(monkeypatch, slow_s, lambda grammar, drafts: grammar.position == 0)
    engine = llm.llm_engine
    schema = SUPPORTED[0]["schema"]
    engine.add_request("plain", PROMPTS[0], SamplingParams(temperature=0, max_tokens=16,
                                                           ignore_eos=True))
    engine.add_request("constrained", PROMPTS[1], SamplingParams(
        n=4, temperature=1.0, seed=2, max_tokens=60,
        structured_outputs=StructuredOutputsParams(json=schema)))
    plain_times: list[float] = []
    first_constrained = None
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            now = time.monotonic()
            if output.request_id == "plain":
                plain_times += [now] * (len(output.outputs[0].token_ids) - len(plain_times))
            elif first_constrained is None and any(c.token_ids for c in output.outputs):
                first_constrained = now
            if output.finished:
                finals[output.request_id] = output
    assert len(plain_times) == 16 and plain_times[-1] < first_constrained
    # a token a step, never a step that waited for the masks
    assert max(b - a for a, b in zip(plain_times, plain_times[1:])) < slow_s / 3
    for completion in finals["constrained"].outputs:
        assert completion.finish_reason == "stop"
        assert_valid(completion.text, schema)


def test_a_mask_past_its_time_fails_its_request_with_an_error(llm, monkeypatch):
    """A mask that is still computing after MAX_MASK_S ends its sequence with an error the
    caller reads (the server sends it as a 400), not a silent finish_reason "abort"."""
    import kvflow.structured_output.bitmask as bitmask

    monkeypatch.setattr(bitmask, "MAX_MASK_S", 0.2)
    _slow_masks(monkeypatch, 1.0, lambda grammar, drafts: grammar.position == 2)
    params = SamplingParams(temperature=0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(json=SUPPORTED[0]["schema"]))
    completion = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "abort" and len(completion.token_ids) == 2
    assert completion.error == "computing the constraint's next-token mask took more than 0.2 s"


def test_mask_threads_serve_each_constraint_in_turn():
    """The jobs of one constraint queue behind each other, not in front of another's: with
    one thread busy on A's first of five jobs, B's job, submitted last, runs next."""
    import threading

    from kvflow.structured_output.fair_pool import FairPool

    pool = FairPool(1, "test-fair")
    release = threading.Event()
    order: list[str] = []

    def job(name: str):
        def run() -> str:
            if name == "a0":
                release.wait(10)
            order.append(name)
            return name
        return run

    futures = [pool.submit("a", job(f"a{i}")) for i in range(5)]
    futures.append(pool.submit("b", job("b0")))
    release.set()
    assert [f.result(10) for f in futures] == ["a0", "a1", "a2", "a3", "a4", "b0"]
    assert order == ["a0", "b0", "a1", "a2", "a3", "a4"]
