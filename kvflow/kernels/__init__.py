"""kvflow's native CPU kernels (csrc/cpu_ops.cpp), compiled with torch.utils.cpp_extension.

They are built once per machine: `make install` builds them (`python -m kvflow.kernels`),
and a first use builds them if that did not happen (about 45 s). The build is
keyed by the source, the CPU's model and its whole list of flags, the compiler and the
torch and Python versions, because it targets the build machine's ISA (-march=native): a
cache carried to another CPU, or a VM with other flags masked, is never loaded there. The
environment is read once per process. When no compiler is at hand, or the build fails,
kvflow logs why and runs the PyTorch path; `enforce_eager=True` (`--enforce-eager`) asks
for that path outright."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
# No implicit FMA contraction: with it, how the compiler unrolled or vectorized a loop
# decided which of its multiply-adds fused, and so a row's result (cpu_ops.cpp fuses
# where it means to).
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")
# What the build takes, for the estimate the log gives: one C++ file, one compiler process
# (40-50 s on a Zen 4 and a Xeon).
BUILD_SECONDS = 45


def _build_key(extra_flags: tuple[str, ...]) -> str:
    import torch

    from kvflow.bench.hardware import cpuinfo

    cpu = cpuinfo()
    compiler = os.environ.get("CXX", "c++")
    key = "|".join([SOURCE.read_bytes().hex(), cpu.get("model name", ""), cpu.get("flags", ""),
                    compiler, torch.__version__, sys.version, *CFLAGS, *extra_flags])
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def build_dir(extra_flags: tuple[str, ...] = ()) -> Path:
    from kvflow.cache import cache_root

    return cache_root() / "kernels" / _build_key(extra_flags)


def _put_ninja_on_path() -> None:
    """The ninja that pip installed beside this interpreter, when the environment is used
    without being activated (`.venv/bin/python ...`)."""
    scripts = Path(sys.executable).parent
    if shutil.which("ninja") is None and (scripts / "ninja").exists():
        os.environ["PATH"] = f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"


@functools.cache
def cpu_ops() -> ModuleType | None:
    """The compiled module for this machine, built on first call; None where it cannot be
    built."""
    if os.environ.get("KVFLOW_NO_NATIVE_KERNELS"):
        logger.info("native CPU kernels disabled by KVFLOW_NO_NATIVE_KERNELS")
        return None
    # Extra compiler flags, e.g. -mno-avx512f: the plain loops a CPU without AVX-512
    # builds, run here (the test suite is run so too).
    extra = tuple(os.environ.get("KVFLOW_KERNEL_CFLAGS", "").split())
    if extra:
        logger.info("native CPU kernels built with %s (KVFLOW_KERNEL_CFLAGS)", " ".join(extra))
    return build(extra)


@functools.cache
def build(extra_flags: tuple[str, ...] = ()) -> ModuleType | None:
    """The kernels compiled with -march=native and extra_flags (the tests build a variant
    with -mno-avx512f, so that the plain-loop paths other CPUs compile are checked too).

    A library already in the build directory is loaded as it is: its key covers everything
    that shapes it, and handing it to ninja again would rebuild it whenever the build
    command differs, as it does from another checkout or virtual environment of the same
    commit (their paths are in the command). A build runs under a lock, in a directory of
    its own, and its library is moved into place whole, so that processes starting
    together build once and never load half a file."""
    directory = build_dir(extra_flags)
    name = f"kvflow_cpu_ops_{directory.name}"
    library = directory / f"{name}.so"
    try:
        if not library.exists():
            directory.mkdir(parents=True, exist_ok=True)
            with _locked(directory.with_name(directory.name + ".lock")):
                if not library.exists():
                    _compile(name, directory, library, extra_flags)
        return _load(name, library)
    except Exception as exc:  # no compiler, no headers, an unsupported ISA: fall back
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        cause = next((line for line in lines if "error" in line.lower()), lines[-1])
        logger.warning("native CPU kernels unavailable, using the PyTorch path: %s (build "
                       "files in %s; the whole output at DEBUG level)", cause.strip(), directory)
        logger.debug("native CPU kernel build output:\n%s", exc)
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(name: str, directory: Path, library: Path, extra_flags: tuple[str, ...]) -> None:
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    staging = Path(tempfile.mkdtemp(prefix=f"{directory.name}.", dir=directory.parent))
    logger.info("building kvflow's native CPU kernels into %s, once per machine: about "
                "%d s", directory, BUILD_SECONDS)
    start = time.monotonic()
    try:
        module = cpp_extension.load(name=name, sources=[str(SOURCE)],
                                    build_directory=str(staging),
                                    extra_cflags=[*CFLAGS, *extra_flags],
                                    extra_ldflags=["-fopenmp"], verbose=False)
        os.replace(staging / library.name, library)
        # The build imported the library from the staging folder; the file it mapped is the
        # one now in place (a rename keeps it), and its module says where that is.
        module.__file__ = str(library)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("native CPU kernels built in %.0f s", time.monotonic() - start)


def _load(name: str, library: Path) -> ModuleType:
    import torch  # noqa: F401 - the library links against torch's, which must be loaded

    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module
