"""llama.cpp as a peer: its `llama-server`, built from the sources vendored in the
llama-cpp-python source distribution on PyPI, serving the same weights converted to a bf16
GGUF, and driven by `kvflow bench serve` with the same token ids.

Everything it needs lives under the kvflow cache (peers/), never in kvflow's own
dependencies."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

import httpx

from kvflow.demo import cache_root


logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"


def peer_dir() -> Path:
    return cache_root() / "peers"


def source_dir() -> Path:
    return peer_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


def server_binary() -> Path:
    return source_dir() / "build" / "bin" / "llama-server"


def _run(command: list[str], cwd: Path | None = None) -> None:
    logger.info("running %s", " ".join(command))
    subprocess.run(command, cwd=cwd, check=True)


def ensure_llama_server(jobs: int | None = None) -> Path:
    """Download the llama-cpp-python sdist and build llama-server from its vendored
    llama.cpp (native CPU flags, Release), once."""
    if server_binary().exists():
        return server_binary()
    peer_dir().mkdir(parents=True, exist_ok=True)
    archive = peer_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not archive.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(peer_dir())])
    if not source_dir().exists():
        with tarfile.open(archive) as tar:
            tar.extractall(peer_dir(), filter="data")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", ".", "-B", "build", *generator, "-DCMAKE_BUILD_TYPE=Release",
          "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON"], cwd=source_dir())
    _run(["cmake", "--build", "build", "--target", "llama-server", "-j",
          str(jobs or os.cpu_count() or 1)], cwd=source_dir())
    return server_binary()


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
    script = _CONVERT.format(root=str(source_dir()), deps=str(deps), model=str(model),
                             out=str(partial))
    _run([sys.executable, "-c", script], cwd=source_dir())
    partial.rename(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(gguf: Path, parallel: int, context_per_sequence: int, threads: int,
                 log: Path) -> Iterator[str]:
    """A running llama-server with `parallel` slots sharing one KV cache; yields its URL."""
    port = _free_port()
    command = [str(ensure_llama_server()), "-m", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "-t", str(threads), "-tb", str(threads),
               "-np", str(parallel), "--kv-unified", "-c", str(parallel * context_per_sequence),
               "--no-webui"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {process.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server not healthy after 300 s; see {log}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
