"""Every attention backend against a per-query loop over the context, on ragged batches:
decodes, short multi-token queries, fresh and continued prefill chunks, GQA and MHA,
sliding windows, gpt-oss's sinks, bf16 and float32."""
from __future__ import annotations

import random

import pytest
import torch

from kvflow.attention.metadata import padded_block_tables
from kvflow.attention.selector import select_backend
from kvflow.layers.attention import PagedAttention

# The CPU's backends; Triton's, under its interpreter, in test_triton_attention.py.
BACKENDS = ["torch", "cpu"]


def naive_attention(q, keys, values, scale, window, sinks=None, softcap=None):
    """q: [L, H, D] for the last L positions of keys/values [S, H_kv, D]; sinks: [H], each
    head's logit that joins the softmax and weights no value; softcap: Gemma 2's cap on
    the scores."""
    query_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    out = torch.empty(query_len, num_heads, q.shape[-1], dtype=torch.float32)
    for i in range(query_len):
        pos = seq_len - query_len + i
        first = 0 if window is None else max(0, pos - window + 1)
        for h in range(num_heads):
            k = keys[first:pos + 1, h // group].float()
            v = values[first:pos + 1, h // group].float()
            scores = k @ q[i, h].float() * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            if sinks is not None:
                scores = torch.cat([scores, sinks[h:h + 1]])
            probs = torch.softmax(scores, dim=0)[:k.shape[0]]
            out[i, h] = probs @ v
    return out


def make_batch(query_lens, context_lens, num_heads, num_kv_heads, head_dim, dtype, seed,
               block_size):
    """Each request's earlier keys and values ([context, H_kv, D]), its blocks (not
    contiguous) and the step's q/k/v."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)  # noqa: E731
    blocks_needed = [-(-(c + q) // block_size) for q, c in zip(query_lens, context_lens)]
    num_blocks = 1 + sum(blocks_needed) + 3
    ids = list(range(1, num_blocks))
    random.Random(seed).shuffle(ids)
    block_ids = []
    for needed in blocks_needed:
        block_ids.append(ids[:needed])
        ids = ids[needed:]
    old_kv = [(rand(c, num_kv_heads, head_dim), rand(c, num_kv_heads, head_dim))
              for c in context_lens]
    num_tokens = sum(query_lens)
    q = rand(num_tokens, num_heads, head_dim)
    k = rand(num_tokens, num_kv_heads, head_dim)
    v = rand(num_tokens, num_kv_heads, head_dim)
    return num_blocks, block_ids, old_kv, q, k, v


def slots_of(ids, positions, block_size):
    return torch.tensor([ids[p // block_size] * block_size + p % block_size for p in positions])


def expected(q, k, v, old_kv, query_lens, scale, window, sinks=None, softcap=None):
    out, start = [], 0
    for (old_k, old_v), query_len in zip(old_kv, query_lens):
        rows = slice(start, start + query_len)
        keys = torch.cat([old_k, k[rows]])
        values = torch.cat([old_v, v[rows]])
        out.append(naive_attention(q[rows], keys, values, scale, window, sinks, softcap))
        start += query_len
    return torch.cat(out)


CASES = {
    "decodes": ([1, 1, 1, 1], [5, 17, 1, 40]),
    "multi-token queries": ([1, 3, 4, 2, 1], [9, 0, 22, 7, 30]),
    "fresh prefills": ([1, 33, 9], [12, 0, 0]),
    "mixed step": ([1, 2, 5, 20, 37], [3, 50, 11, 0, 21]),
    # Longer than the native kernel's 512-token partition: split across threads and merged.
    "long contexts": ([1, 3, 1], [1300, 700, 511]),
    # Prefill chunks of several query tiles, each over several 64-key softmax chunks.
    "long prefills": ([150, 70], [100, 0]),
}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("window", [None, 6, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 16])
def test_backend_matches_naive(backend_name, case, heads, window, dtype, block_size,
                               kernel_ops):
    check_backend(backend_name, kernel_ops, case, heads, window, dtype, block_size, head_dim=32)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", ["mixed step", "long contexts"])
@pytest.mark.parametrize("block_size,head_dim", [(24, 40), (32, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_matches_naive_at_other_shapes(backend_name, case, block_size, head_dim,
                                               dtype, kernel_ops):
    """A head_dim that is not a multiple of 16 (vector tails; in bfloat16 the native
    kernel's float32 path, where the CPU has bf16 pairs) and blocks of more than 16
    tokens, which a 64-key chunk reads in pieces, with a window across blocks."""
    check_backend(backend_name, kernel_ops, case, (8, 2), 20, dtype, block_size, head_dim)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_with_sinks(backend_name, case, window, dtype, kernel_ops):
    """gpt-oss's sinks, one per query head: small ones, one that outweighs every key (the
    head attends to nearly nothing) and one far below them, through split contexts too."""
    sinks = torch.tensor([0.5, -1.0, 40.0, -60.0, 2.0, 0.0, 1.5, -3.0])
    check_backend(backend_name, kernel_ops, case, (8, 2), window, dtype, 16, head_dim=32,
                  sinks=sinks)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", ["mixed step", "long contexts"])
def test_backend_with_softcap(backend_name, case, kernel_ops):
    """Gemma 2's soft cap, small enough (5) to bend scores of this size."""
    check_backend(backend_name, kernel_ops, case, (8, 2), None, torch.float32, 16,
                  head_dim=32, softcap=5.0)


def test_sinks_change_the_output(kernel_ops):
    """The sinks are not idle: without them the same batch attends otherwise."""
    with pytest.raises(AssertionError):
        check_backend("torch", kernel_ops, "mixed step", (4, 2), None, torch.float32, 16,
                      head_dim=32, sinks=torch.full((4,), 1.0), reference_sinks=None)


def check_backend(backend_name, ops, case, heads, window, dtype, block_size, head_dim,
                  sinks=None, reference_sinks="same", softcap=None, device="cpu"):
    """reference_sinks: the sinks of the reference ("same": the layer's); device: where the
    backend runs (the reference runs on the CPU)."""
    device = torch.device(device)
    query_lens, context_lens = CASES[case]
    order = sorted(range(len(query_lens)), key=lambda i: query_lens[i])  # as the runner does
    query_lens = [query_lens[i] for i in order]
    context_lens = [context_lens[i] for i in order]
    num_heads, num_kv_heads = heads
    num_blocks, block_ids, old_kv, q, k, v = make_batch(query_lens, context_lens, num_heads,
                                                        num_kv_heads, head_dim, dtype, seed=7,
                                                        block_size=block_size)
    reference = expected(q, k, v, old_kv, query_lens, head_dim ** -0.5, window,
                         sinks if isinstance(reference_sinks, str) else reference_sinks,
                         softcap)
    backend = select_backend(backend_name, device, ops, dtype=dtype)
    layer = PagedAttention(num_heads, num_kv_heads, head_dim, window, softcap=softcap,
                           sinks=sinks is not None).to(device)
    if sinks is not None:
        layer.sinks.data.copy_(sinks)
    k_shape, v_shape = backend.kv_cache_shapes(num_blocks, num_kv_heads, block_size, head_dim)
    # Garbage in unwritten slots must never be read.
    layer.bind(backend, torch.randn(k_shape).to(device, dtype),
               torch.randn(v_shape).to(device, dtype))
    for ids, (old_k, old_v), context_len in zip(block_ids, old_kv, context_lens):
        if context_len:
            backend.write_kv(layer, old_k.to(device), old_v.to(device),
                             slots_of(ids, range(context_len), block_size).to(device))
    meta = backend.build_metadata(query_lens, context_lens,
                                  padded_block_tables(block_ids, device), block_size, device)
    out = layer(q.to(device), k.to(device), v.to(device), meta).cpu()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), reference, atol=tolerance, rtol=tolerance)
    # The step's keys and values landed in their slots, as the backend reads them back.
    start = 0
    for ids, (old_k, old_v), query_len in zip(block_ids, old_kv, query_lens):
        seq_len = old_k.shape[0] + query_len
        keys, values = backend.gather_context(layer, torch.tensor(ids, device=device), seq_len)
        keys, values = keys.cpu(), values.cpu()
        rows = slice(start, start + query_len)
        assert torch.equal(keys, torch.cat([old_k, k[rows]]).transpose(0, 1))
        assert torch.equal(values, torch.cat([old_v, v[rows]]).transpose(0, 1))
        start += query_len


def test_unknown_backend_is_refused():
    from kvflow.engine.args import EngineArgs

    with pytest.raises(ValueError, match="attention_backend"):
        EngineArgs(attention_backend="flash-but-not-here")
