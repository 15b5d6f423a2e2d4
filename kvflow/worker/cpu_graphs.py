"""Decode steps on the CPU replayed as a list of recorded kernel calls: the CPU's CUDA graph.

A decode step of a small model on two cores spends a fifth of its time between kernels:
the forward pass's Python (some 290 module calls), the dispatcher and small tensor
operations, about 13 us per native kernel call on a Zen 4 (docs/benchmarks.md). The
kernels themselves read every input through a tensor, so once a step has been run over
static buffers (cuda_graphs.DecodeBuffers), running the same kernel calls on the same
tensors again computes the next step: no Python in between.

`cpu_capture` runs the forward pass once and records, in order, every call into the
native kernel module and every ATen operation that computes data outside those calls (a
TorchDispatchMode sees them; views and allocations are not work). Replaying calls each
again; a call that returned a fresh tensor writes into the one recorded, which the later
calls read: through the kernel's `out=` where it takes one (the GEMVs, RMSNorm and
SiLU-and-mul do: a copy per call was a tenth of an int4 step of a 0.5B model on a Zen 4),
else by a copy. A step that reads a tensor's value on the host (`item()`),
or makes a tensor from host data, could do something else on the next step's values: it
is refused at capture (`NotCapturable`), and the engine runs eagerly.

The native module replays a step from C++ (its `Program`): each kernel call bound to its
arguments once, at capture, and the recorded ATen operations called back in Python in
their places. A Python loop over the calls cost a few microseconds each in interpreter
and argument conversion, more after the step's weight stream had flushed the caches:
whole int8 decode steps of a 0.5B model ran 1.045x as fast replayed from C++ on a 2-core
Xeon, bf16 ones 1.028x (docs/performance.md).
"""
from __future__ import annotations

import ast
import functools
import inspect
import re
import threading
from collections.abc import Callable
from types import BuiltinFunctionType, ModuleType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kvflow.worker.cuda_graphs import Capture, Replay

# The largest decode batch captured on the CPU by default: past it a step's Python is a
# small share of its work, and each size captured costs a forward pass at start-up.
CPU_MAX_CAPTURE_SIZE = 16

# ATen operations that make no data worth recording: fresh memory, or a view of a tensor
# the replay keeps (its storage is checked as well, for the views not named here).
_NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
            "detach", "alias"}
# Operations whose result depends on something a replay would not recompute: a value read
# on the host, a tensor made from host data (torch.tensor), a shape set by the data.
_HOST_READS = {"_local_scalar_dense", "item", "lift_fresh", "lift_fresh_copy", "equal",
               "is_nonzero", "nonzero", "unique", "_unique2", "masked_select"}


class NotCapturable(RuntimeError):
    """The step does work a replay of its kernel calls cannot repeat."""


def _tensors(value: Any) -> list[torch.Tensor]:
    # A replayed kernel returns one tensor: spared pytree's microsecond, 171 times a step.
    if isinstance(value, torch.Tensor):
        return [value]
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor)]


def _storage(tensor: torch.Tensor) -> int | None:
    """Where a tensor's storage starts; None for an opaque one (oneDNN's prepacked
    weights), which is never a step's output."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return None


def _storages(value: Any) -> set[int]:
    return {_storage(t) for t in _tensors(value)} - {None}


_REQUIRED = object()  # a parameter without a default


def _parameters(fn: BuiltinFunctionType) -> list[tuple[str, Any]] | None:
    """A native kernel's parameters in order, each with its default (_REQUIRED where it
    has none), from the signature pybind11 heads its docstring with; None where that
    cannot be read."""
    signature = (fn.__doc__ or "").partition("\n")[0]
    match = re.fullmatch(rf"{re.escape(fn.__name__)}\((.*)\) -> .*", signature)
    if match is None:
        return None
    parts, depth, start = [], 0, 0
    text = match.group(1)
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    parameters = []
    for part in filter(str.strip, parts):
        declared, _, default = part.partition(" = ")
        name = declared.partition(":")[0].strip()
        try:
            parameters.append((name, ast.literal_eval(default) if default else _REQUIRED))
        except (ValueError, SyntaxError):
            return None
    return parameters


def _takes_out(fn: Callable) -> bool:
    """Whether fn can write its result into a tensor given as `out=` (default None): a
    native kernel says so in the signature pybind11 heads its docstring with."""
    if isinstance(fn, BuiltinFunctionType):
        return ("out", None) in (_parameters(fn) or [])
    try:
        parameter = inspect.signature(fn).parameters.get("out")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is None


class _Call:
    """One recorded call: the function, its arguments, and the tensors it returned fresh
    (None where it wrote in place or returned a view of an argument), which a replay
    passes as `out=` where the function takes one (`into`)."""

    __slots__ = ("fn", "args", "kwargs", "outputs", "into")

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, result: Any) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        fresh = _tensors(result)
        inputs = _storages((args, kwargs))
        self.outputs = (None if not fresh or any(_storage(t) in inputs for t in fresh)
                        else fresh)
        self.into = (isinstance(result, torch.Tensor) and self.outputs is not None
                     and "out" not in kwargs and _takes_out(fn))

    def __call__(self) -> None:
        if self.into:
            self.fn(*self.args, out=self.outputs[0], **self.kwargs)
            return
        result = self.fn(*self.args, **self.kwargs)
        if self.outputs is not None:
            for recorded, new in zip(self.outputs, _tensors(result), strict=True):
                recorded.copy_(new)


class _Recorder(TorchDispatchMode):
    """Records the ATen operations that compute data outside the native kernels' calls."""

    def __init__(self, calls: list[_Call]) -> None:
        super().__init__()
        self.calls = calls
        self.inside_native = 0  # a native kernel's own ATen calls are its business

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.inside_native:
            return result
        name = func.overloadpacket.__name__
        if name in _HOST_READS:
            raise NotCapturable(f"the step reads a tensor on the host (aten.{name})")
        if name in _NO_WORK or func.is_view:
            return result
        self.calls.append(_Call(func, args, kwargs, result))
        return result


def _wrapped(ops: ModuleType, recorder: _Recorder) -> dict[str, Callable]:
    """Each public function of the native module, recording its calls from this thread
    (the module is the process's: another engine's thread may call it meanwhile)."""
    originals = {name: getattr(ops, name) for name in dir(ops)
                 if not name.startswith("_") and callable(getattr(ops, name))}
    capturing = threading.get_ident()
    for name, fn in originals.items():
        def record(*args, _fn=fn, **kwargs):
            if threading.get_ident() != capturing:
                return _fn(*args, **kwargs)
            recorder.inside_native += 1
            try:
                result = _fn(*args, **kwargs)
            finally:
                recorder.inside_native -= 1
            if not recorder.inside_native:
                recorder.calls.append(_Call(_fn, args, kwargs, result))
            return result

        setattr(ops, name, functools.wraps(fn)(record))
    return originals


def _kernel_arguments(ops: ModuleType, call: _Call) -> tuple | None:
    """A call of one of the native module's kernels as all of the kernel's arguments in
    order (the recorded output as its `out` where it writes into it); None for any other
    call, or one whose signature cannot be read."""
    fn = call.fn
    name = getattr(fn, "__name__", "")
    if not isinstance(fn, BuiltinFunctionType) or getattr(ops, name, None) is not fn:
        return None
    parameters = _parameters(fn)
    if parameters is None or len(call.args) > len(parameters):
        return None
    given = dict(call.kwargs, **({"out": call.outputs[0]} if call.into else {}))
    values = list(call.args)
    for parameter, default in parameters[len(values):]:
        value = given.pop(parameter, default)
        if value is _REQUIRED:
            return None
        values.append(value)
    return None if given else tuple(values)


def _program(ops: ModuleType, calls: list[_Call]) -> Any:
    """The calls as the native module's Program (None where the module has none): each
    kernel call bound to its arguments in C++, every other call kept as it is."""
    program_type = getattr(ops, "Program", None)
    if program_type is None:
        return None
    program = program_type()
    for call in calls:
        arguments = _kernel_arguments(ops, call)
        if arguments is None:
            program.add_python(call)
        else:
            copied_into = [] if call.into or call.outputs is None else call.outputs
            program.add_kernel(call.fn.__name__, arguments, copied_into)
    return program


def cpu_capture(ops: ModuleType) -> Capture:
    """A Capture (cuda_graphs.py) for models whose kernels come from `ops`, the native
    module: the forward pass run once, recorded, and replayed as its calls, from C++
    where the module has a Program (the native kernels' calls bound to their arguments
    there, the recorded ATen operations called back in Python between them)."""

    def capture(forward: Replay) -> Replay:
        calls: list[_Call] = []
        recorder = _Recorder(calls)
        originals = _wrapped(ops, recorder)
        try:
            with recorder:
                output = forward()
        finally:
            for name, fn in originals.items():
                setattr(ops, name, fn)

        program = _program(ops, calls)
        if program is not None:
            def replay() -> torch.Tensor:
                program.run()
                return output
        else:
            def replay() -> torch.Tensor:
                for call in calls:
                    call()
                return output

        replay.calls = calls  # for benchmarks and tests that look inside a step
        replay.program = program
        return replay

    return capture
