"""llama.cpp as a peer: its `llama-server`, built from the sources vendored in the
llama-cpp-python source distribution on PyPI, serving the same weights converted to a bf16
GGUF, and driven by `kvflow bench serve` with the same token ids.

Everything it needs lives under the kvflow cache (peers/), never in kvflow's own
dependencies."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import httpx

from kvflow.bench.hardware import cpuinfo
from kvflow.cache import cache_root


logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"


def peer_dir() -> Path:
    return cache_root() / "peers"


def source_dir() -> Path:
    return peer_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


# Executes AMX's tile instructions, as llama.cpp's AMX kernels do; exits 0 if they run.
_AMX_PROBE = r"""
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void) {
    unsigned char config[64] = {0};
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */))
        return 1;
    config[0] = 1;    /* palette 1 */
    config[16] = 64;  /* tile 0: 64 bytes a row */
    config[48] = 16;  /* tile 0: 16 rows */
    /* GCC does not see ldtilecfg read the array and drops the two stores above; a tile
       left unconfigured then traps on any CPU. The empty asm makes the stores land. */
    __asm__ volatile("" : : "r"(config) : "memory");
    _tile_loadconfig(config);
    _tile_zero(0);
    _tile_release();
    return 0;
}
"""


def has_amx() -> bool:
    return "amx_tile" in cpuinfo().get("flags", "").split()


@functools.cache
def amx_traps() -> bool:
    """Whether the CPU lists AMX but its instructions trap, as in a virtual machine that
    does not pass the tile state through. GGML_NATIVE would then compile llama.cpp's AMX
    kernels in, and every Q8_0 and Q4 file would die in them (bf16 does not use them)."""
    if not has_amx():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        source, probe = Path(tmp) / "probe.c", Path(tmp) / "probe"
        source.write_text(_AMX_PROBE)
        subprocess.run(["cc", "-O1", "-mamx-tile", str(source), "-o", str(probe)], check=True)
        return subprocess.run([str(probe)]).returncode != 0


def build_dir(amx: bool = True) -> Path:
    """llama.cpp's native build ("build"), or where the CPU lists AMX and AMX is not
    wanted or traps, one compiled without its AMX kernels ("build-no-amx")."""
    no_amx = has_amx() and (not amx or amx_traps())
    return source_dir() / ("build-no-amx" if no_amx else "build")


def server_binary(amx: bool = True) -> Path:
    return build_dir(amx) / "bin" / "llama-server"


def quantize_binary() -> Path:
    return build_dir() / "bin" / "llama-quantize"


class Crashed(RuntimeError):
    """A llama.cpp program ended by a signal."""


def exit_error(program: str, returncode: int, detail: str) -> RuntimeError:
    """Crashed where a signal ended the program, else a RuntimeError."""
    kind = Crashed if returncode < 0 else RuntimeError
    return kind(f"{program} exited with {returncode}: {detail}")


T = TypeVar("T")


def without_amx_if_crashed(run: Callable[[bool], T]) -> T:
    """run(True), in the native build; where that dies by a signal and the CPU has a build
    without AMX to offer, run(False) instead. llama.cpp's AMX kernels can run one row and
    crash on more: on a 2-core Xeon with AMX (2026-12-07) its Q8_0 and Q4_K_M decode ran
    in them at nearly twice the speed of the build without, and its 512-token prompts and
    its batches died in `ldtilecfg` (SIGSEGV, or SIGILL). So each test gets the fastest
    build that runs it. Returns run's result (a result with `settings`), which records
    the crash it replaced as settings["native_build_crashed"]."""
    try:
        return run(True)
    except Crashed as crash:
        if build_dir(amx=False) == build_dir():
            raise
        logger.warning("%s; again in llama.cpp's build without AMX", crash)
        result = run(False)
        result.settings["native_build_crashed"] = str(crash)
        return result


def _run(command: list[str], cwd: Path | None = None) -> None:
    logger.info("running %s", " ".join(command))
    subprocess.run(command, cwd=cwd, check=True)


# What kvflow runs of llama.cpp: the server, the quantizer, and its own benchmarks.
BINARIES = ("llama-server", "llama-quantize", "llama-bench", "llama-batched-bench")


def ensure_llama_server(jobs: int | None = None, amx: bool = True) -> Path:
    """Download the llama-cpp-python sdist and build BINARIES from its vendored llama.cpp
    into build_dir(amx) (native CPU flags, less AMX where that is the build; Release),
    once."""
    directory = build_dir(amx)
    if all((directory / "bin" / name).exists() for name in BINARIES):
        return server_binary(amx)
    peer_dir().mkdir(parents=True, exist_ok=True)
    archive = peer_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not archive.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(peer_dir())])
    if not source_dir().exists():
        with tarfile.open(archive) as tar:
            tar.extractall(peer_dir(), filter="data")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    # Explicit -mno-* flags win over what GGML_NATIVE's -march=native implies.
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    flags = ([f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
             if directory.name == "build-no-amx" else [])
    _run(["cmake", "-S", ".", "-B", directory.name, *generator, "-DCMAKE_BUILD_TYPE=Release",
          "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON", *flags], cwd=source_dir())
    _run(["cmake", "--build", directory.name, "--target", *BINARIES, "-j",
          str(jobs or os.cpu_count() or 1)], cwd=source_dir())
    return server_binary(amx)


# llama.cpp's converter names a checkpoint's pre-tokenizer by hashing how it splits a test
# string, and refuses hashes it does not know. kvflow's benchmark and demo tokenizers are
# byte-level BPE with GPT-2's split regex, which is llama.cpp's "gpt-2" pre-tokenizer; the
# benchmarks send token ids, so this only decides how llama.cpp would tokenize text.
_CONVERT = """
import runpy, sys
sys.path[:0] = [{root!r}, {root!r} + "/gguf-py", {deps!r}]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def known_or_gpt2(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = known_or_gpt2
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outtype", "bf16", "--outfile", {out!r}]
runpy.run_path({root!r} + "/convert_hf_to_gguf.py", run_name="__main__")
"""


# Families whose converter reads only a SentencePiece tokenizer.model (their real
# checkpoints ship one); random-weight benchmark checkpoints carry a BPE tokenizer.json.
_SENTENCEPIECE_ONLY = ("Gemma2ForCausalLM", "Phi3ForCausalLM")
_TRAIN_SENTENCEPIECE = """
import sys
sys.path.insert(0, {deps!r})
import sentencepiece as spm
from kvflow.bench.make_model import _tokenizer_corpus
spm.SentencePieceTrainer.train(sentence_iterator=iter(_tokenizer_corpus()),
                               model_prefix={prefix!r}, vocab_size={vocab}, model_type="bpe",
                               byte_fallback=True, hard_vocab_limit=False,
                               max_sentence_length=1 << 16, minloglevel=2)
"""


def _converter_source(model: Path, deps: Path) -> Path:
    """The checkpoint as the converter can read it: for a family whose converter needs a
    SentencePiece tokenizer.model and a checkpoint without one, a folder of links to its
    files and a tokenizer.model trained on the benchmark tokenizer's corpus. Benchmarks
    send token ids, so what the model's tokens spell does not enter any figure."""
    import json

    config = json.loads((model / "config.json").read_text())
    if (config.get("architectures") or [""])[0] not in _SENTENCEPIECE_ONLY or \
            (model / "tokenizer.model").exists():
        return model
    shadow = Path(tempfile.mkdtemp(prefix=f"{model.name}-", dir=peer_dir()))
    for file in model.iterdir():
        (shadow / file.name).symlink_to(file.resolve())
    vocab = min(4096, int(config["vocab_size"]))
    _run([sys.executable, "-c", _TRAIN_SENTENCEPIECE.format(
        deps=str(deps), prefix=str(shadow / "tokenizer"), vocab=vocab)])
    (shadow / "tokenizer.vocab").unlink()
    return shadow


def convert_to_gguf(model: Path, out: Path | None = None) -> Path:
    """The checkpoint as a bf16 GGUF file, cached beside the peer under a key of its
    config and weight files (path, size, mtime), so a rebuilt checkpoint converts again."""
    if out is None:
        files = sorted(p for p in Path(model).resolve().iterdir()
                       if p.name == "config.json" or p.suffix == ".safetensors")
        key = hashlib.sha1(repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns)
                                 for p in files]).encode()).hexdigest()[:12]
        out = peer_dir() / "gguf" / f"{Path(model).resolve().name}-{key}-bf16.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if not source_dir().exists():
        ensure_llama_server()
    # The converter tries sentencepiece before BPE; it gets a folder of its own.
    deps = peer_dir() / "convert-deps"
    if not (deps / "sentencepiece").exists():
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps),
              "sentencepiece"])
    partial = out.with_suffix(".partial")
    source = _converter_source(Path(model), deps)
    try:
        script = _CONVERT.format(root=str(source_dir()), deps=str(deps), model=str(source),
                                 out=str(partial))
        _run([sys.executable, "-c", script], cwd=source_dir())
    finally:
        if source != Path(model):
            shutil.rmtree(source)
    partial.rename(out)
    return out


# The GGUF files llama.cpp users download: the converter's bf16 file, and llama-quantize's
# recipes of it that issue 10 measures kvflow's int8 and int4 against.
GGUF_TYPES = ("BF16", "Q8_0", "Q4_0", "Q4_K_M")


def quantize_gguf(bf16: Path, ftype: str) -> Path:
    """The bf16 GGUF as llama.cpp's own `llama-quantize` makes `ftype` of it (its default
    recipe: Q4_K_M keeps some tensors at Q6_K, and falls back to other types for rows that
    are not whole 256-weight super-blocks), cached beside it."""
    if ftype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {ftype!r}; choose from {list(GGUF_TYPES)}")
    if ftype == "BF16":
        return bf16
    out = bf16.with_name(f"{bf16.stem.removesuffix('-bf16')}-{ftype}.gguf")
    if out.exists():
        return out
    ensure_llama_server()
    partial = out.with_suffix(".partial")
    _run([str(quantize_binary()), str(bf16), str(partial), ftype])
    partial.rename(out)
    return out


def gguf_tensor_types(gguf: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF file holds: what a recipe's name does not say."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(gguf).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


_BUFFER = re.compile(r"(\S+)\s+(model|KV|RS|compute|output) buffer size =\s*([\d.]+) MiB")


def buffer_sizes(log: str) -> dict[str, int]:
    """The buffers llama.cpp's log reports allocating, in bytes, by backend and kind
    ("CPU_Mapped model": the file's tensor data, mapped and read in place, the originals of
    repacked tensors included; "CPU_REPACK model": copies of weights in the layout its CPU
    kernels read, such as Q4_0's; "CPU KV": the KV cache)."""
    sizes: dict[str, int] = {}
    for backend, kind, mib in _BUFFER.findall(log):
        key = f"{backend} {kind}"
        sizes[key] = sizes.get(key, 0) + round(float(mib) * 2**20)
    return sizes


def buffer_total(buffers: dict[str, int], kind: str) -> int | None:
    """One kind's buffers ("model": the weights; "KV"), over every backend; None if the log
    named none."""
    sizes = [size for key, size in buffers.items() if key.endswith(f" {kind}")]
    return sum(sizes) if sizes else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(gguf: Path, parallel: int, context_per_sequence: int, threads: int,
                 log: Path, amx: bool = True) -> Iterator[tuple[str, int]]:
    """A running llama-server with `parallel` slots sharing one KV cache, loaded and warmed
    up, from build_dir(amx); yields its URL and process id. Raises Crashed where the
    server died by a signal, starting or while it was used."""
    port = _free_port()
    command = [str(ensure_llama_server(amx=amx)), "-m", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "-t", str(threads), "-tb", str(threads),
               "-np", str(parallel), "--kv-unified", "-c", str(parallel * context_per_sequence),
               "--no-webui",
               # llama.cpp's own load log, with the buffers it allocates, reaches the
               # server's log at trace level; it adds lines per request, not per token.
               "-lv", "4"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None:
                    raise exit_error("llama-server", process.returncode, f"see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server not healthy after 300 s; see {log}")
                time.sleep(0.5)
            yield url, process.pid
            if process.poll() is not None:
                raise exit_error("llama-server", process.returncode, f"see {log}")
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
