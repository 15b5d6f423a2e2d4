"""kvflow's native CPU kernels against the eager PyTorch ops they replace.

float32 results agree to float32 rounding; bfloat16 results to a bf16 rounding step (the
kernels round where the eager ops do, but sum in another order)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import random_prompts
from kvflow import LLM, SamplingParams
from kvflow.kernels import variants
from kvflow.models.config import RopeConfig
from kvflow.layers.activation import SiluAndMul
from kvflow.layers.norm import RMSNorm
from kvflow.layers.rotary import RotaryEmbedding
from kvflow.quantization.int4 import blocked_scales, quantize_int4
from kvflow.quantization.int8 import quantize_int8, weight_block_sums

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def ops(kernel_ops):
    return kernel_ops


def close(actual, expected, dtype, scale=1.0):
    tolerance = 1e-5 * scale if dtype == torch.float32 else 1.6e-2 * scale
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)


# Every way the tuning may have a GEMV read its weight.
VARIANTS = pytest.mark.parametrize("variant", variants.CANDIDATES, ids=str)


@VARIANTS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("out_features,in_features",
                         [(64, 896), (130, 100), (3, 64), (7, 17), (5, 48), (9, 200)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(ops, dtype, rows, out_features, in_features, bias, variant):
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    w = (torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5).to(dtype)
    b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    close(ops.gemv(x, w, b, variant.streams, variant.prefetch), expected, dtype, scale=4)


@pytest.mark.parametrize("streams,prefetch,message", [
    (2, 0, "streams must be 1 or 4, not 2"), (4, -1, "prefetch must be 0 to 65536 bytes, not -1"),
    (1, 1 << 20, "not 1048576")])
def test_gemv_variants_outside_the_kernels_are_refused(ops, streams, prefetch, message):
    x, w = torch.randn(1, 64), torch.randn(8, 64)
    with pytest.raises(RuntimeError, match=message):
        ops.gemv(x, w, None, streams, prefetch)
    with pytest.raises(RuntimeError, match=message):
        ops.int8_gemv(x, w.to(torch.int8), torch.ones(8), None, streams, prefetch)


def _pair(module_factory, ops):
    eager, native = module_factory(), module_factory()
    native.load_state_dict(eager.state_dict())
    native.native = ops
    return eager, native


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_eager(ops, dtype, with_residual):
    generator = torch.Generator().manual_seed(1)

    dim = 100  # not a multiple of 16: the vector loop and its scalar tail

    def make():
        norm = RMSNorm(dim, 1e-6)
        norm.weight.data = (1 + 0.1 * torch.randn(dim, generator=torch.Generator().manual_seed(2))
                            ).to(dtype)
        return norm

    eager, native = _pair(make, ops)
    x = torch.randn(5, dim, generator=generator).to(dtype)
    residual = torch.randn(5, dim, generator=generator).to(dtype)
    if not with_residual:
        close(native(x), eager(x), dtype)
        return
    expected_out, expected_residual = eager(x, residual.clone())
    native_residual = residual.clone()
    out, returned = native(x, native_residual)
    close(out, expected_out, dtype)
    assert torch.equal(returned, expected_residual)  # the add rounds exactly as eager does
    assert torch.equal(native_residual, expected_residual)  # updated in place, as eager does


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_eager(ops, dtype):
    eager, native = _pair(SiluAndMul, ops)
    x = torch.randn(6, 2 * 40, generator=torch.Generator().manual_seed(3)).to(dtype)
    close(native(x), eager(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_eager_on_fused_qkv_views(ops, dtype):
    heads, kv_heads, head_dim = 4, 2, 32
    make = lambda: RotaryEmbedding(head_dim, 64, RopeConfig(theta=10000.0))  # noqa: E731
    eager, native = _pair(make, ops)
    qkv = torch.randn(7, (heads + 2 * kv_heads) * head_dim,
                      generator=torch.Generator().manual_seed(4)).to(dtype)
    positions = torch.tensor([0, 5, 9, 10, 33, 62, 63])

    def split(t):
        q, k, _ = t.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        return q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim)

    expected_q, expected_k = eager(positions, *split(qkv.clone()))
    native_qkv = qkv.clone()
    q, k = native(positions, *split(native_qkv))
    close(q, expected_q, dtype)
    close(k, expected_k, dtype)
    # In place, and the values stay untouched.
    v_start = (heads + kv_heads) * head_dim
    assert torch.equal(native_qkv[:, v_start:], qkv[:, v_start:])


@pytest.mark.parametrize("bad", [-2, 64, 10**12])
def test_positions_and_slots_out_of_range_are_refused(ops, bad):
    """Checked in one pass over the values (not min() and max()), at either end: a
    position past the cos/sin cache, a slot past the KV cache, a negative one (but -1, a
    padding token's slot, which writes nothing)."""
    cos = torch.ones(64, 32)
    q, k = torch.zeros(3, 4, 32), torch.zeros(3, 2, 32)
    with pytest.raises(RuntimeError, match="beyond the cos/sin cache"):
        ops.rotary_embedding(torch.tensor([0, bad, 5]), q, k, cos, cos)
    ops.rotary_embedding(torch.tensor([0, 63, 5]), q, k, cos, cos)
    k_cache, v_cache = torch.zeros(4, 2, 32, 16), torch.zeros(4, 2, 16, 32)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.write_kv(k_cache, v_cache, k, k, torch.tensor([3, 2, bad]))
    k = torch.randn(3, 2, 32)
    ops.write_kv(k_cache, v_cache, k, k, torch.tensor([3, -1, 63]))
    assert torch.equal(v_cache[0, :, 3], k[0]) and torch.equal(v_cache[3, :, 15], k[2])
    assert int((v_cache != 0).any(-1).sum()) == 2 * 2  # two tokens' two heads, no more


def test_native_and_eager_engines_agree_in_bfloat16(checkpoint):
    """Whole-model bf16: the native path's prompt logprobs stay within bf16 rounding of the
    eager path's, and enforce_eager really turns every native kernel off."""
    path = checkpoint("qwen2", dtype="bfloat16")
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=9, low=20, high=30)]
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0, ignore_eos=True)
    results = {}
    for eager in (False, True):
        llm = LLM(str(path), device="cpu", kv_cache_memory="8MiB", enforce_eager=eager)
        engine = llm.engine
        model = engine.runner.model
        natives = [m.native for m in model.modules() if hasattr(m, "native")]
        plans = [m.plan for m in model.modules() if hasattr(m, "plan")] + [model.lm_head_plan]
        assert engine.runner.backend.name == ("torch" if eager else "cpu")
        assert all(n is None for n in natives) if eager else all(n is not None for n in natives)
        assert all(p is None for p in plans) if eager else all(p is not None for p in plans)
        assert (engine.runner.sampler.native is None) == eager  # the greedy argmax
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results[eager] = [[next(iter(entry.values())).logprob for entry in o.prompt_logprobs[1:]]
                          for o in outputs]
    for native_lp, eager_lp in zip(results[False], results[True]):
        torch.testing.assert_close(torch.tensor(native_lp), torch.tensor(eager_lp),
                                   atol=0.15, rtol=0.05)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_plan_paths_match_f_linear(ops, dtype, bias):
    """Every path a LinearPlan can take (native GEMV, oneDNN-prepacked weight, a float32
    copy, F.linear) gives F.linear's result. The plans are built by hand, so that every
    path runs whatever the measurement would pick on this machine."""
    from kvflow.kernels.tuning import _can_prepack, _packed
    from kvflow.quantization.unquantized import LinearPlan, apply_linear

    generator = torch.Generator().manual_seed(5)
    w = (torch.randn(48, 64, generator=generator) / 8).to(dtype)
    b = torch.randn(48, generator=generator).to(dtype) if bias else None
    plans = [LinearPlan(ops=ops, gemv_max_rows=4),
             LinearPlan(ops=ops, gemv_max_rows=4, float32_weight=w.float(),
                        float32_bias=None if b is None else b.float())]
    if _can_prepack(dtype):
        plans.append(LinearPlan(ops=ops, gemv_max_rows=4, packed_weight=_packed(w)))
    for plan in plans:
        for rows in (1, 4, 5, 17, 130):  # 17 and 130 run padded on the prepacked path
            x = torch.randn(rows, 64, generator=generator).to(dtype)
            close(apply_linear(x, w, b, plan), F.linear(x, w, b), dtype, scale=4)


def test_prepacked_products_run_at_few_row_counts():
    """oneDNN caches a primitive per input shape; the prepacked path rounds row counts so
    that a server whose batch changes every step meets few shapes, and memory stays flat."""
    from kvflow.quantization.unquantized import packed_rows

    shapes = {packed_rows(rows) for rows in range(9, 2049)}
    assert len(shapes) == 24 and all(shape % 16 == 0 for shape in shapes)
    for rows in range(9, 4097):
        assert rows <= packed_rows(rows) <= max(rows + 15, rows * 1.25)


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2"], ids=["untied-head", "tied-head"])
def test_every_linear_gets_one_plan(ops, checkpoint, variant):
    """Each weight is planned once: an untied LM head through its Linear, a tied one (the
    embedding) through the model's lm_head_plan; a second copy is made per weight only."""
    from kvflow.models.config import ModelConfig
    from kvflow.kernels.tuning import install_native_kernels
    from kvflow.layers.linear import Linear
    from kvflow.models.loader import load_model

    path = checkpoint(variant)
    config = ModelConfig.from_pretrained(path)
    model = load_model(config, torch.float32, torch.device("cpu"), 64)
    install_native_kernels(model, ops)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.plan is not None and m.plan.ops is ops for m in linears)
    assert all(m.plan.gemv_variant in variants.CANDIDATES for m in linears)
    if config.tie_word_embeddings:
        assert model.lm_head is None and model.lm_head_plan is not None
    else:
        assert model.lm_head_plan is None and model.lm_head in linears
    hidden = torch.randn(3, config.hidden_size)
    torch.testing.assert_close(model.compute_logits(hidden),
                               F.linear(hidden, model.model.embed_tokens.weight
                                        if config.tie_word_embeddings else model.lm_head.weight),
                               atol=1e-4, rtol=1e-4)


def test_the_tuning_times_every_run_from_memory_not_from_cache(ops, checkpoint, monkeypatch,
                                                                tmp_path):
    """A shape's weights can all fit in the last-level cache, where a decode step (reading
    every other weight between two of them) never finds them: every timed run starts after
    reading twice that cache's bytes of other memory, which the tuning frees when done."""
    import functools

    from kvflow.kernels import tuning
    from kvflow.models.config import ModelConfig
    from kvflow.models.loader import load_model

    for index, size in enumerate(["32K", "1024K", "32768K"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert tuning._last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert tuning._last_level_cache_bytes(tmp_path / "none") is None

    events = []

    class Evicting:
        def sum(self):
            events.append("evict")
    monkeypatch.setattr(tuning, "_eviction_buffer", functools.cache(Evicting))
    assert tuning._fastest(("a", "b"), events.append) in ("a", "b")
    assert events == ["evict", "a", "evict", "b"] * (tuning.VARIANT_ROUNDS + 1)

    events.clear()
    monkeypatch.undo()
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path / "cache"))  # nothing measured before
    evictions = []
    real = tuning._seconds
    monkeypatch.setattr(tuning, "_seconds", lambda fn, device=None: (
        evictions.append(tuning._eviction_buffer().numel() * 4), real(fn, device))[1])
    config = ModelConfig.from_pretrained(checkpoint("llama-gqa"))
    model = load_model(config, torch.float32, torch.device("cpu"), 64)
    tuning.install_native_kernels(model, ops)
    wanted = max(tuning.EVICTION_MIN_BYTES, 2 * (tuning._last_level_cache_bytes() or 0))
    assert evictions and set(evictions) == {wanted}
    assert tuning._eviction_buffer.cache_info().currsize == 0  # freed

    def fail(*args):  # a tuning that fails halfway frees the buffer as well
        tuning._eviction_buffer()
        raise RuntimeError("out of memory")
    monkeypatch.setattr(tuning, "_plan_experts", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        tuning.install_native_kernels(model, ops)
    assert tuning._eviction_buffer.cache_info().currsize == 0


def test_another_checkout_of_the_same_source_loads_the_built_kernels(tmp_path):
    """A second checkout (another path, so other paths in the build command) finds the
    library this one built and loads it: it neither compiles nor hands it to ninja, which
    rebuilt it from every other checkout."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import kvflow
    from kvflow.kernels import cpu_ops

    assert cpu_ops() is not None  # built by this checkout
    package = Path(kvflow.__file__).parent
    shutil.copytree(package, tmp_path / "kvflow", ignore=shutil.ignore_patterns("assets",
                                                                               "__pycache__"))
    script = ("import kvflow.kernels as k\n"
              "def refuse(*args): raise SystemExit('compiled again')\n"
              "k._compile = refuse\n"
              "import torch.utils.cpp_extension as c\nc.load = refuse\n"
              "m = k.cpu_ops()\nprint(k.__file__, m.__file__)")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    checkout, library = done.stdout.split()
    assert checkout.startswith(str(tmp_path)) and library == cpu_ops().__file__


@VARIANTS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features", [896, 100, 17])
def test_the_gemv_sums_a_row_the_same_way_in_any_batch(ops, dtype, in_features, variant):
    """Batch invariance rests on this: a row's outputs are bitwise the same alone, in a
    batch of any size and at any position in it (both builds: the compiler fuses no
    multiply-add of its own accord), whichever way the weight is read."""
    generator = torch.Generator().manual_seed(in_features)
    w = torch.randn(37, in_features, generator=generator).to(dtype)
    bias = torch.randn(37, generator=generator).to(dtype)
    x = torch.randn(150, in_features, generator=generator).to(dtype)

    def gemv(rows: torch.Tensor) -> torch.Tensor:
        return ops.gemv(rows, w, bias, variant.streams, variant.prefetch)

    alone = torch.cat([gemv(x[i:i + 1]) for i in range(len(x))])
    for rows in (2, 3, 5, 64, 65, 150):
        assert torch.equal(gemv(x[:rows]), alone[:rows]), rows
    assert torch.equal(gemv(x[70:]), alone[70:])


def test_kernels_write_their_result_into_out_when_given_one(ops):
    """A captured decode step replays each kernel into the tensor it recorded: the result
    is the same, bit for bit, in the tensor given; a tensor of another shape or dtype, or
    one that shares memory with an input, is refused."""
    generator = torch.Generator().manual_seed(7)
    w = torch.randn(64, 128, generator=generator) / 11
    x = torch.randn(2, 128, generator=generator).to(torch.bfloat16)
    bf16 = w.to(torch.bfloat16)
    q8, s8 = quantize_int8(w, torch.bfloat16)
    q4, s4, o4 = quantize_int4(w, 64, torch.bfloat16)
    residual = torch.randn(2, 128, generator=generator).to(torch.bfloat16)
    kernels = {
        "gemv": lambda out=None: ops.gemv(x, bf16, None, out=out),
        "int8_gemv": lambda out=None: ops.int8_gemv(x, q8, s8, None, out=out),
        "int8_gemv_q8": lambda out=None: ops.int8_gemv_q8(x, q8, s8, weight_block_sums(q8),
                                                          None, out=out),
        "int4_gemv": lambda out=None: ops.int4_gemv(x, q4, s4, o4, None, out=out),
        "int4_gemv_q8": lambda out=None: ops.int4_gemv_q8(x, q4, blocked_scales(s4, o4), None,
                                                          out=out),
        "rms_norm": lambda out=None: ops.rms_norm(x, bf16[0], None, 1e-6, out=out),
        "silu_and_mul": lambda out=None: ops.silu_and_mul(x, out=out),
    }
    for name, kernel in kernels.items():
        expected = kernel()
        out = torch.full_like(expected, float("nan"))
        assert kernel(out) is not None and torch.equal(out, expected), name
        with pytest.raises(RuntimeError, match="out must be"):
            kernel(torch.empty(expected.shape[0] + 1, *expected.shape[1:], dtype=expected.dtype))
        with pytest.raises(RuntimeError, match="out must be"):
            kernel(torch.empty(expected.shape))  # float32
        if expected.shape == x.shape:
            with pytest.raises(RuntimeError, match="memory location"):
                kernel(x)
    before = residual.clone()
    with pytest.raises(RuntimeError, match="memory location"):
        ops.rms_norm(x, bf16[0], residual, 1e-6, out=residual)
    assert torch.equal(residual, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows_is_torch_max_indices(ops, dtype):
    """The greedy choice: the first index of each row's largest value, the first NaN where
    a row has one, all -inf at 0; on rows split among the threads (over 16K columns) and
    not, at any thread count."""
    generator = torch.Generator().manual_seed(3)
    cases = []
    for rows, cols in [(1, 151936), (1, 40000), (3, 33000), (5, 17), (8, 1), (2, 1000)]:
        x = torch.randn(rows, cols, generator=generator)
        ties = x.round().clamp(max=2)  # many equal maxima
        nans = x.clone()
        nans[:, cols // 2:] = float("nan")  # a NaN in a later segment than the maximum
        nans[:, -1] = float("nan")
        cases += [x, ties, nans, torch.full((rows, cols), -float("inf"))]
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for x in cases:
                x = x.to(dtype)
                assert torch.equal(ops.argmax_rows(x), x.max(dim=-1).indices), (threads, x.shape)
    finally:
        torch.set_num_threads(saved)
    with pytest.raises(RuntimeError, match="must be \\[rows, columns\\]"):
        ops.argmax_rows(torch.zeros(3))


def test_attention_multiplies_on_amx_tiles_where_the_cpu_has_them():
    """A CPU that lists AMX's bf16 tiles gets them in the native build: neither a build
    that lost the path nor a refused request for the tile registers passes unnoticed."""
    from kvflow.bench.hardware import cpuinfo
    from kvflow.kernels import cpu_ops

    flags = set(cpuinfo().get("flags", "").split())
    native = cpu_ops()
    if native is None or not {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags:
        pytest.skip("this CPU has no AMX bf16 tiles")
    if os.environ.get("KVFLOW_KERNEL_CFLAGS"):
        pytest.skip("the build's ISA was narrowed by KVFLOW_KERNEL_CFLAGS")
    assert native.vector_paths().endswith("+amx")


def test_every_gemv_that_takes_a_prefetch_distance_prefetches():
    """A prefetch changes no result, so only the compiled code shows one was dropped: GCC
    12 found the out-of-line prefetch_ahead free of side effects and deleted its calls from
    the int8 VNNI kernel, whose prefetch variants then all read alike. Each compiled GEMV
    that takes a prefetch distance must issue prefetches."""
    import re
    import shutil
    import subprocess

    from kvflow.kernels import cpu_ops

    native = cpu_ops()
    if native is None or not native.vector_paths().startswith("avx512"):
        pytest.skip("the prefetches are in the AVX-512 paths only")
    if shutil.which("objdump") is None:
        pytest.skip("no objdump to read the compiled kernels")
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", native.__file__],
                             capture_output=True, text=True, check=True).stdout
    prefetches: dict[str, int] = {}
    function = None
    for line in listing.splitlines():
        if header := re.match(r"[0-9a-f]+ <(.*)>:$", line):
            function = header[1]
            prefetches[function] = 0
        elif function and "prefetcht0" in line:
            prefetches[function] += 1
    # The loops over weight chunks (the lambdas) hold the inlined inner steps.
    for kernel in ("gemv_impl<", "int8_q8_impl<"):
        bodies = {name: count for name, count in prefetches.items()
                  if name.startswith(f"(anonymous namespace)::{kernel}") and "{lambda" in name}
        assert len(bodies) >= 4 and all(bodies.values()), (kernel, bodies)


@pytest.mark.parametrize("threads", [2, 3])
def test_every_gemv_computes_each_row_once_however_threads_share_the_weight(ops, threads):
    """The GEMVs hand a weight out in chunks, a thread done with its own share taking the
    rest of another's: with the weight in dozens of chunks, every output row is computed,
    once, bitwise as one thread computes it, call after call (a lost chunk would leave the
    output's uninitialized memory, a chunk taken twice races with itself)."""
    generator = torch.Generator().manual_seed(threads)
    w = torch.randn(1040, 256, generator=generator) / 16
    x = torch.randn(3, 256, generator=generator).to(torch.bfloat16)
    bf16 = w.to(torch.bfloat16)
    q8, s8 = quantize_int8(w, torch.bfloat16)
    q4, s4, o4 = quantize_int4(w, 64, torch.bfloat16)
    gemvs = {
        "gemv": lambda v: ops.gemv(x, bf16, None, v.streams, v.prefetch),
        "int8_gemv": lambda v: ops.int8_gemv(x, q8, s8, None, v.streams, v.prefetch),
        "int8_gemv_q8": lambda v: ops.int8_gemv_q8(x, q8, s8, weight_block_sums(q8), None,
                                                   v.streams, v.prefetch),
        "int4_gemv": lambda v: ops.int4_gemv(x, q4, s4, o4, None),
        "int4_gemv_q8": lambda v: ops.int4_gemv_q8(x, q4, blocked_scales(s4, o4), None),
    }
    saved = torch.get_num_threads()
    try:
        for name, gemv in gemvs.items():
            for variant in variants.CANDIDATES:
                torch.set_num_threads(1)
                alone = gemv(variant)
                torch.set_num_threads(threads)
                for _ in range(10):
                    assert torch.equal(gemv(variant), alone), (name, str(variant))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 12, 100])  # 100: more than a 64-key chunk
@pytest.mark.parametrize("head_dim", [16, 40, 64])
def test_attention_without_context_split_is_the_same_for_any_query_grouping(ops, dtype,
                                                                           window, head_dim):
    """A query's output is bitwise the same whether it is one decode, part of a short
    verification query, or anywhere in a prefill chunk, however the prompt is chunked
    (in bfloat16, head_dim 16 takes the bf16 pair path where the CPU has one, 40 not, and
    64 AMX tiles where the CPU has those)."""
    generator = torch.Generator().manual_seed(window)
    heads, kv_heads, block_size, length = 4, 2, 16, 700
    blocks = length // block_size + 1
    k_cache = torch.zeros(blocks, kv_heads, head_dim, block_size, dtype=dtype)
    v_cache = torch.zeros(blocks, kv_heads, block_size, head_dim, dtype=dtype)
    k, v = (torch.randn(length, kv_heads, head_dim, generator=generator).to(dtype)
            for _ in range(2))
    q = torch.randn(length, heads, head_dim, generator=generator).to(dtype)
    ops.write_kv(k_cache, v_cache, k, v, torch.arange(length))
    table = torch.arange(blocks, dtype=torch.int32)[None]

    def attend(first: int, end: int) -> torch.Tensor:
        """Queries first..end-1 as one request's step, the keys before them cached."""
        out = torch.empty_like(q[first:end])
        ops.paged_attention(out, q[first:end].contiguous(), k_cache, v_cache, table,
                            torch.tensor([end], dtype=torch.int32),
                            torch.tensor([0, end - first], dtype=torch.int32), 0.25, window,
                            False, 0.0)
        return out

    whole = attend(0, length)
    for cuts in ([0, 37, 74, 300, 616, length], [0, 1, 2, 3, 20, 21, 533, 536, length]):
        parts = torch.cat([attend(a, b) for a, b in zip(cuts, cuts[1:])])
        assert torch.equal(parts, whole), cuts
    decodes = torch.cat([attend(i, i + 1) for i in range(0, length, 7)])
    assert torch.equal(decodes, whole[::7])
