"""The CPU's captured decode steps (kvflow/worker/cpu_graphs.py): a forward pass recorded
as its native kernel calls and the ATen operations between them, replayed on new inputs;
what cannot be replayed refused at capture; engines whose decode steps replay them, token
for token with the same engines stepping through Python, and with transformers."""
from __future__ import annotations

import threading
import types

import pytest
import torch

from conftest import (assert_greedy_matches, hf_greedy, random_prompts,
                      without_decode_graphs)
from kvflow import LLM, SamplingParams
from kvflow.worker.cpu_graphs import NotCapturable, _parameters, cpu_capture


def fake_ops():
    """A kernel module of two functions: one writes its output in place, one returns a
    fresh tensor (as the native GEMVs do)."""
    module = types.ModuleType("fake_ops")

    def scale_into(out, x, factor):
        torch.mul(x, factor, out=out)

    def plus_one(x):
        return x + 1

    module.scale_into, module.plus_one = scale_into, plus_one
    return module


def test_replay_reads_new_inputs_through_every_recorded_call():
    ops = fake_ops()
    x = torch.tensor([1.0, 2.0])
    out = torch.empty(2)

    def forward():
        ops.scale_into(out, x, 3.0)  # in place
        y = ops.plus_one(out)  # a fresh tensor, copied into the recorded one at replay
        return (y * 2).view(2)  # an ATen operation between the calls, and a view

    replay = cpu_capture(ops)(forward)
    assert ops.scale_into.__name__ == "scale_into" and not hasattr(ops.scale_into,
                                                                   "__wrapped__")
    x.copy_(torch.tensor([5.0, -1.0]))
    result = replay()
    assert result.tolist() == [(5 * 3 + 1) * 2, (-1 * 3 + 1) * 2]
    assert replay() is result  # the recorded output, written again


def test_a_kernel_that_takes_out_replays_into_the_recorded_tensor():
    """A fresh result is written where the later calls read it: through `out=` where the
    function takes one (no copy), by a copy where it does not."""
    ops = fake_ops()
    given = []

    def double(x, out=None):
        given.append(out)
        return torch.mul(x, 2, out=out) if out is not None else x * 2

    ops.double = double
    x = torch.tensor([1.0, 2.0])

    def forward():
        return ops.plus_one(ops.double(x))

    replay = cpu_capture(ops)(forward)
    assert [call.into for call in replay.calls] == [True, False]
    recorded = replay.calls[0].outputs[0]
    x.copy_(torch.tensor([3.0, 4.0]))
    given.clear()
    assert replay().tolist() == [7.0, 9.0]
    assert len(given) == 1 and given[0] is recorded and recorded.tolist() == [6.0, 8.0]


def test_calls_from_other_threads_are_not_recorded():
    """The kernel module is the process's: another engine's thread calling it during a
    capture is not part of the step."""
    ops = fake_ops()
    calls = []
    scale_into = ops.scale_into
    ops.scale_into = lambda *a: calls.append(1) or scale_into(*a)
    x, out = torch.ones(2), torch.empty(2)

    def forward():
        other = threading.Thread(target=ops.scale_into, args=(torch.empty(2), x, 2.0))
        other.start()
        other.join()
        ops.scale_into(out, x, 3.0)
        return out

    replay = cpu_capture(ops)(forward)
    calls.clear()
    replay()
    assert len(calls) == 1


@pytest.mark.parametrize("read", [
    lambda x: x.sum().item(),  # a value read on the host
    lambda x: x + torch.tensor([1.0, 2.0]),  # a tensor made from host data
    lambda x: x.nonzero(),  # a shape set by the data
], ids=["item", "tensor", "nonzero"])
def test_steps_a_replay_could_not_repeat_are_refused(read):
    ops = fake_ops()
    x = torch.ones(2)
    with pytest.raises(NotCapturable):
        cpu_capture(ops)(lambda: read(ops.plus_one(x)))
    assert not hasattr(ops.plus_one, "__wrapped__")  # the module is given back


def test_native_kernel_calls_replay_from_cpp_between_recorded_aten_ops(kernel_ops):
    """With the native module, a replay runs its Program: each kernel call bound once to
    its arguments (its recorded output as `out` where the kernel takes one, a copy into it
    where it returned a fresh tensor without one), the ATen operations between them called
    back in Python."""
    ops = kernel_ops
    torch.manual_seed(0)
    x, w, norm = torch.randn(2, 64), torch.randn(16, 64), torch.rand(64) + 0.5

    def forward():
        h = ops.rms_norm(x, norm, None, 1e-6)
        y = ops.gemv(h, w, None, prefetch=0)
        return ops.argmax_rows(y * -2.0)

    replay = cpu_capture(ops)(forward)
    assert len(replay.program) == len(replay.calls) == 4
    assert [call.into for call in replay.calls] == [True, True, False, False]
    for seed in (1, 2):
        x.copy_(torch.randn(2, 64, generator=torch.Generator().manual_seed(seed)))
        expected = forward()
        assert torch.equal(replay(), expected)


def test_a_program_refuses_an_unknown_kernel_and_wrong_arguments(kernel_ops):
    program = kernel_ops.Program()
    x, w = torch.randn(1, 64), torch.randn(16, 64)
    with pytest.raises(RuntimeError, match="no kernel named nope"):
        program.add_kernel("nope", (), [])
    with pytest.raises(RuntimeError, match="a kernel of 6 parameters given 2 arguments"):
        program.add_kernel("gemv", (x, w), [])
    with pytest.raises(RuntimeError):  # a string where the kernel takes a tensor
        program.add_kernel("gemv", ("x", w, None, 4, 0, None), [])
    assert len(program) == 0


def test_every_native_kernel_signature_is_read_for_the_program(kernel_ops):
    """A kernel whose signature could not be read would replay through Python unnoticed."""
    kernels = [getattr(kernel_ops, name) for name in dir(kernel_ops)
               if isinstance(getattr(kernel_ops, name), types.BuiltinFunctionType)]
    assert len(kernels) > 10
    assert all(_parameters(fn) is not None for fn in kernels)
    assert ("out", None) in _parameters(kernel_ops.gemv)


def steps_through_python(llm) -> list[int]:
    """How many times the first decoder layer runs in Python from now on."""
    calls = []
    llm.engine.executor.runner.model.model.layers[0].register_forward_pre_hook(
        lambda *_: calls.append(1))
    return calls


def test_decode_steps_replay_recorded_kernels_and_match_python_and_transformers(
        checkpoint, hf_model):
    """Five requests of different lengths: steps of 5 and 3 requests are padded to the
    graphs of 8 and 4, whose padding writes no KV; the decode steps never run the model's
    Python, and the tokens are those of the same engine stepping through it."""
    path = checkpoint("llama-gqa")
    prompts = random_prompts(5, seed=11)
    lengths = [12, 9, 12, 6, 12]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB")
    graphs = llm.engine.executor.runner.graphs
    assert graphs is not None and graphs.sizes[1] == [1, 2, 4, 8, 16]
    # the GEMVs, norms and activations replay into the tensors the step recorded
    fresh = [call for call in graphs.graphs[1, 1].calls if call.outputs is not None
             and getattr(call.fn, "__name__", "") in ("gemv", "rms_norm", "silu_and_mul")]
    assert fresh and all(call.into for call in fresh)
    # every call of the step replays from the native module's Program
    assert len(graphs.graphs[1, 1].program) == len(graphs.graphs[1, 1].calls)
    python_steps = steps_through_python(llm)
    outputs = llm.generate(requests, params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert len(python_steps) <= 2  # the prefills; every decode step replayed
    eager = without_decode_graphs(
        LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB"))
    python_steps = steps_through_python(eager)
    expected = [o.outputs[0].token_ids for o in eager.generate(requests, params,
                                                                 use_tqdm=False)]
    assert len(python_steps) >= max(lengths) - 1
    assert tokens == expected
    for output, prompt, n in zip(tokens, prompts, lengths):
        assert_greedy_matches([output], [hf_greedy(hf_model(path), prompt, n)], n)


def test_enforce_eager_and_a_refused_capture_run_without_graphs(checkpoint, caplog,
                                                                 monkeypatch):
    path = checkpoint("llama-gqa")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB",
              enforce_eager=True)
    assert llm.engine.executor.runner.graphs is None

    def refuse(self):
        raise NotCapturable("the step reads a tensor on the host (aten.item)")

    monkeypatch.setattr("kvflow.worker.cuda_graphs.DecodeGraphs.capture_all", refuse)
    with caplog.at_level("WARNING"):
        llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB")
    assert llm.engine.executor.runner.graphs is None
    assert "decode graphs: off, the step reads a tensor on the host" in caplog.text
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                       SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
