"""Structured output: constraints, their compilation and cache, bitmasks, and generation that
always matches (JSON schemas, regular expressions, choices, grammars) on a random-weight
model and on the demo model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from conftest import random_prompts
from kvflow import LLM, SamplingParams, StructuredOutputsParams
from kvflow.demo import demo_model_path
from kvflow.sampling_params import ParameterError
from kvflow.structured_output.bitmask import GrammarMasker, apply_token_bitmask, bitmask_width
from kvflow.structured_output.compiler import GrammarCompiler

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
    tokenizer = compiler._hf_tokenizer
    compiled = compiler.compile(StructuredOutputsParams(json=SUPPORTED[0]["schema"]))
    masker = GrammarMasker(compiler.vocab_size)
    drafts = tokenizer.encode('{"name": "ab')
    grammar = compiled.matcher()
    before = masker.fill([grammar])
    at_drafts = masker.fill([grammar], [drafts])
    assert torch.equal(masker.fill([grammar]), before)  # rolled back
    stepwise = compiled.matcher()
    for row, token in enumerate(drafts):
        assert torch.equal(at_drafts[row], masker.fill([stepwise])[0])
        assert stepwise.accept([token])
    assert torch.equal(at_drafts[len(drafts)], masker.fill([stepwise])[0])
    stepwise.rollback(len(drafts))
    assert torch.equal(masker.fill([stepwise]), before)


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


@pytest.mark.parametrize("pattern", [r"[a-z]{3,8}", r"\d{3}-\d{4}", r"(yes|no|maybe)",
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


def test_preempted_requests_keep_their_matchers(checkpoint, llm):
    schemas = [e["schema"] for e in SUPPORTED[:12]]
    # Text prompts: random ids can end inside a UTF-8 character that the output then completes.
    prompts = [f"# record {i}\n" + "value = compute(a, b)\n" + PROMPTS[i % len(PROMPTS)]
               for i in range(len(schemas))]
    params = [SamplingParams(temperature=0, max_tokens=60,
                             structured_outputs=StructuredOutputsParams(json=s))
              for s in schemas]
    roomy = llm.generate(prompts, params, use_tqdm=False)
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
