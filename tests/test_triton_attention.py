"""Triton's attention (kvflow/kernels/triton_ops) against the same per-query loop as the
CPU's backends, under Triton's interpreter where there is no GPU: ragged batches of
decodes, short multi-token queries, fresh and continued prefill chunks, GQA, MHA and MQA,
sliding windows, soft caps, sinks, and long contexts split across programs and merged.
The interpreter runs each program in Python, so the long cases are few."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (make test installs it)")

from kvflow.attention.selector import select_backend  # noqa: E402
from test_attention import CASES, check_backend  # noqa: E402

SHORT_CASES = sorted(set(CASES) - {"long contexts"})
# Compiled on a GPU where there is one; the interpreter's CPU otherwise.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS = {"gqa": (4, 2), "mha": (4, 4), "mqa": (8, 1), "group-of-7": (14, 2)}


@pytest.mark.parametrize("case", SHORT_CASES)
@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("window", [None, 6])
def test_triton_matches_naive(case, heads, window):
    check_backend("triton", None, case, HEADS[heads], window, torch.float32, 16, head_dim=32,
                  device=DEVICE)


@pytest.mark.parametrize("case", SHORT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16]  # the interpreter's
                         + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("block_size,head_dim", [(4, 32), (24, 40), (32, 64)])
def test_triton_at_other_shapes(case, dtype, block_size, head_dim):
    """Blocks smaller and larger than a tile's keys and not a power of two, head_dim not a
    power of two (masked columns), a window across blocks."""
    check_backend("triton", None, case, (8, 2), 20, dtype, block_size, head_dim, device=DEVICE)


@pytest.mark.parametrize("case", SHORT_CASES)
@pytest.mark.parametrize("window", [None, 6])
def test_triton_with_sinks(case, window):
    """gpt-oss's sinks: one that outweighs every key, one far below them."""
    sinks = torch.tensor([0.5, -1.0, 40.0, -60.0, 2.0, 0.0, 1.5, -3.0])
    check_backend("triton", None, case, (8, 2), window, torch.float32, 16, head_dim=32,
                  sinks=sinks, device=DEVICE)


@pytest.mark.parametrize("heads,window,extra", [
    ("gqa", None, {}), ("group-of-7", 600, {}), ("mqa", 6, {}), ("mha", None, {"softcap": 5.0}),
    ("gqa", 600, {"sinks": torch.tensor([0.5, -1.0, 40.0, -60.0])})])
def test_triton_long_contexts_split_and_merged(heads, window, extra):
    """Contexts of up to 1,301 keys with a few queries each: too few programs for a GPU,
    so each tile's keys are split across programs and merged (with the sink, if any)."""
    backend = select_backend("triton", torch.device(DEVICE), None)
    num_kv_heads = HEADS[heads][1]
    assert backend._splits(3 * num_kv_heads, max_seq_len=1301) > 1
    check_backend("triton", None, "long contexts", HEADS[heads], window, torch.float32, 16,
                  head_dim=32, **extra, device=DEVICE)


@pytest.mark.parametrize("case", ["mixed step", "decodes"])
def test_triton_with_softcap(case):
    check_backend("triton", None, case, (8, 2), None, torch.float32, 16, head_dim=32,
                  softcap=5.0, device=DEVICE)


def test_batch_invariant_never_splits():
    backend = select_backend("triton", torch.device(DEVICE), None, batch_invariant=True)
    assert backend._splits(1, max_seq_len=100_000) == 1
    backend = select_backend("triton", torch.device(DEVICE), None)
    assert backend._splits(backend.target_programs, max_seq_len=100_000) == 1
    assert backend._splits(1, max_seq_len=100) == 1


@pytest.mark.skipif(DEVICE == "cuda", reason="a GPU compiles Triton's kernels")
def test_bfloat16_under_the_interpreter_is_refused_by_name():
    with pytest.raises(ValueError, match="bfloat16"):
        select_backend("triton", torch.device("cpu"), None, dtype=torch.bfloat16)


@pytest.mark.parametrize("variant,options", [
    ("llama-gqa", {}), ("mistral-window", {}),
    # chunks of 7 tokens continue from cached blocks; the prompts share a prefix
    ("llama-gqa", {"max_num_batched_tokens": 7})], ids=["gqa", "window", "chunked"])
def test_engine_with_triton_matches_transformers(variant, options, checkpoint, hf_model):
    """The whole engine on Triton's attention, greedy, token for token with transformers."""
    from conftest import assert_greedy_matches, hf_greedy, random_prompts
    from kvflow import LLM, SamplingParams

    path = checkpoint(variant)
    prompts = random_prompts(6, seed=3)
    if options:
        prompts = [prompts[0][:20] + p for p in prompts]
    llm = LLM(str(path), dtype="float32", device=DEVICE, kv_cache_memory="16MiB",
              attention_backend="triton", **options)
    assert llm.engine.executor.runner.backend.name == "triton"
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    reference = [hf_greedy(hf_model(path), p, 12) for p in prompts]
    assert_greedy_matches([o.outputs[0].token_ids for o in outputs], reference, 12)


def test_triton_on_the_cpu_without_the_interpreter_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        select_backend("triton", torch.device("cpu"), None)
    from kvflow.engine.args import EngineArgs

    with pytest.raises(ValueError, match="batch_invariant"):
        EngineArgs(attention_backend="triton", batch_invariant=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(32, 32), (40, 40), (64, 32)],
                         ids=["whole", "odd-half", "partial"])
def test_rope_fused_into_the_kv_write(head_dim, rotary_dim, dtype):
    """forward_rotary's one kernel against RoPE then the write: q rotated in place, k
    rotated into the cache (the padding token's slot -1 written nowhere), v beside it."""
    from kvflow.layers.attention import PagedAttention
    from kvflow.layers.rotary import RotaryEmbedding
    from kvflow.models.config import RopeConfig

    device = torch.device(DEVICE)
    backend = select_backend("triton", device, None, dtype=dtype)
    rope = RotaryEmbedding(rotary_dim, 256, RopeConfig(theta=10000.0)).to(device)
    heads, kv_heads, tokens, block_size = 6, 2, 5, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim,
                      generator=torch.Generator().manual_seed(3)).to(device, dtype)
    positions = torch.tensor([0, 7, 8, 200, 3], device=device)
    slots = torch.tensor([1, 9, 10, -1, 4], device=device)

    def split(fused):
        q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], 1)
        return (q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim),
                v.view(tokens, kv_heads, head_dim))

    shape = (4, kv_heads, block_size, head_dim)
    layers = []
    for _ in range(2):
        layer = PagedAttention(heads, kv_heads, head_dim, None)
        layer.bind(backend, torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))
        layers.append(layer)
    fused = qkv.clone()
    q, k, v = split(fused)
    backend.ops.rope_and_write_kv(positions, q, k, v, rope.cos, rope.sin, layers[0].k_cache,
                                  layers[0].v_cache, slots)
    ref_q, ref_k = rope(positions, *split(qkv.clone())[:2])
    keep = slots >= 0
    backend.write_kv(layers[1], ref_k[keep], split(qkv)[2][keep], slots[keep])
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=0)
    torch.testing.assert_close(q, ref_q, **tolerance)
    torch.testing.assert_close(layers[0].k_cache, layers[1].k_cache, **tolerance)
    assert torch.equal(layers[0].v_cache, layers[1].v_cache)
