"""CUDA's Triton glue (kvflow/kernels/triton_ops/glue.py), under Triton's interpreter
where there is no GPU, against the eager layers it replaces: RMSNorm with and without the
residual add (and Gemma's float32 weight), SiLU-and-mul, and RoPE in place on strided
views, whole and partial. float16 checks that each result is rounded where eager rounds."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed (make test installs it)")

from kvflow.kernels.triton_ops import glue_ops  # noqa: E402
from kvflow.kernels.tuning import attach_glue  # noqa: E402
from kvflow.layers.activation import GeluTanhAndMul, SiluAndMul  # noqa: E402
from kvflow.layers.moe import FusedMoE  # noqa: E402
from kvflow.layers.norm import GemmaRMSNorm, RMSNorm  # noqa: E402
from kvflow.layers.rotary import RotaryEmbedding  # noqa: E402
from kvflow.models.config import RopeConfig  # noqa: E402

# Compiled on a GPU where there is one; the interpreter's CPU otherwise, which runs
# float32 and float16 but not bfloat16.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def glue():
    from kvflow.kernels.triton_ops import cuda_ops as module

    return module


def attached(layer: nn.Module) -> nn.Module:
    """A copy of the layer on the Triton kernels, through the installer the builder uses."""
    layer = copy.deepcopy(layer).to(DEVICE)
    holder = nn.ModuleList([layer])
    attach_glue(holder, glue())
    assert layer.native is glue()
    return layer


def assert_alike(actual, expected):
    """float32: within the error of summing in another order. float16: rounded where eager
    rounds, so equal but for the odd last bit (an exp or a sum of squares computed
    otherwise); a kernel that skipped one of eager's roundings differs in many elements."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        return
    ulp = 2e-3 if actual.dtype == torch.float16 else 1.6e-2  # two of the last bit
    torch.testing.assert_close(actual, expected, atol=ulp, rtol=ulp)
    differing = (actual != expected).float().mean().item()
    assert differing <= 0.005, f"{differing:.1%} of the elements differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 200])
@pytest.mark.parametrize("norm_type", [RMSNorm, GemmaRMSNorm])
def test_rms_norm(norm_type, dim, dtype):
    generator = torch.Generator().manual_seed(0)
    norm = norm_type(dim, 1e-6)
    norm.weight.data.copy_(torch.randn(dim, generator=generator) * 0.2 + 1)
    norm = (norm.to(dtype) if norm_type is RMSNorm else norm).to(DEVICE)
    fast = attached(norm)
    x = (torch.randn(7, dim, generator=generator) * 3).to(DEVICE, dtype)
    assert_alike(fast(x), norm(x))
    residual = torch.randn(7, dim, generator=generator).to(DEVICE, dtype)
    out, new_residual = fast(x, residual.clone())
    ref_out, ref_residual = norm(x, residual.clone())
    assert torch.equal(new_residual, ref_residual)
    assert_alike(out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [48, 1500])
def test_silu_and_mul(d, dtype):
    x = (torch.randn(5, 2 * d, generator=torch.Generator().manual_seed(1)) * 4).to(DEVICE, dtype)
    assert_alike(attached(SiluAndMul())(x), SiluAndMul()(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (40, 40), (64, 32)],
                         ids=["whole", "odd-half", "partial"])
def test_rotary_in_place_on_strided_views(head_dim, rotary_dim, dtype):
    """q and k are views of one fused QKV output, as the attention block hands them over."""
    rope = RotaryEmbedding(rotary_dim, 512, RopeConfig(theta=10000.0)).to(DEVICE)
    heads, kv_heads, tokens = 6, 2, 9
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim,
                      generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    positions = torch.tensor([0, 1, 2, 3, 100, 101, 7, 511, 40], device=DEVICE)

    def split(fused):
        q = fused[:, :heads * head_dim].view(tokens, heads, head_dim)
        k = fused[:, heads * head_dim:(heads + kv_heads) * head_dim].view(
            tokens, kv_heads, head_dim)
        return q, k

    ref_q, ref_k = rope(positions, *split(qkv))
    fused = qkv.clone()
    q, k = attached(rope)(positions, *split(fused))
    assert_alike(q, ref_q)
    assert_alike(k, ref_k)
    # in place, and the values beside q and k (v) untouched
    assert torch.equal(fused[:, (heads + kv_heads) * head_dim:],
                       qkv[:, (heads + kv_heads) * head_dim:])
    assert_alike(split(fused)[0], ref_q)


def test_layers_without_a_glue_kernel_stay_eager(caplog):
    """Triton's glue has no GELU kernel: that layer is never offered it, and the log names
    it. The experts take Triton's expert kernel (tests/test_triton_moe.py)."""
    experts = FusedMoE(4, 32, 16, SiluAndMul())
    model = nn.ModuleList([RMSNorm(32, 1e-6), GeluTanhAndMul(), experts])
    with caplog.at_level("INFO"):
        attach_glue(model, glue())
    assert model[0].native is glue()
    assert experts.plan is not None and experts.plan.ops is glue()
    assert "FusedMoE" not in caplog.text and "GeluTanhAndMul" in caplog.text


def test_glue_runs_on_cuda_only_and_not_eager():
    assert glue_ops(torch.device("cuda"), torch.bfloat16, False) is glue()
    assert glue_ops(torch.device("cuda"), torch.bfloat16, True) is None
    assert glue_ops(torch.device("cpu"), torch.float32, False) is None


def test_model_on_triton_glue_and_attention_matches_transformers(checkpoint, hf_model):
    """An engine's model with every glue layer and its attention on Triton's kernels (what
    CUDA runs), greedy, token for token with transformers."""
    from conftest import assert_greedy_matches, hf_greedy, random_prompts
    from kvflow import LLM, SamplingParams

    path = checkpoint("qwen3")
    llm = LLM(str(path), dtype="float32", device=DEVICE, kv_cache_memory="8MiB",
              enforce_eager=True, attention_backend="triton")
    model = llm.engine.executor.runner.model
    attach_glue(model, glue())
    hooked = [m for m in model.modules() if hasattr(m, "native")]
    assert hooked and all(m.native is glue() for m in hooked)
    prompts = random_prompts(4, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    reference = [hf_greedy(hf_model(path), p, 10) for p in prompts]
    assert_greedy_matches([o.outputs[0].token_ids for o in outputs], reference, 10)
