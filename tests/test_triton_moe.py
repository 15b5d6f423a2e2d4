"""Triton's expert kernel (kvflow/kernels/triton_ops/moe.py) against FusedMoE's PyTorch
path, on the CPU under Triton's interpreter (compiled where there is a GPU): the rows
sorted by expert on the device, every activation, biases, experts with no rows; and a
mixture-of-experts model on it, its decode steps through captured graphs, token for token
with transformers."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (make test installs it)")

from kvflow.kernels.tuning import attach_glue  # noqa: E402
from kvflow.layers.activation import ClampedSwiGLU, GeluTanhAndMul, SiluAndMul  # noqa: E402
from kvflow.layers.moe import FusedMoE  # noqa: E402
from kvflow.quantization.int8 import Int8Config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
EXPERTS, HIDDEN, INNER = 8, 48, 40  # neither a power of two: the tiles' edges are masked


def cuda_ops():
    from kvflow.kernels.triton_ops import cuda_ops as module

    return module


def layer_of(activation: torch.nn.Module, dtype: torch.dtype, bias: bool,
             seed: int = 0) -> FusedMoE:
    generator = torch.Generator().manual_seed(seed)
    layer = FusedMoE(EXPERTS, HIDDEN, INNER, activation, bias=bias)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            scale = 0.2 if "bias" in name else param.shape[-1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return layer.to(DEVICE, dtype)


def routing(tokens: int, top_k: int, seed: int, experts: int = EXPERTS
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top_k distinct experts among the first `experts` (the rest have no
    rows), and the router's weights."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k]
                       for _ in range(tokens)]) if tokens else torch.zeros(0, top_k,
                                                                             dtype=torch.long)
    weights = torch.rand(tokens, top_k, generator=generator)
    return weights.to(DEVICE), ids.to(DEVICE)


def test_align_sorts_every_choice_into_blocks_of_one_expert():
    from kvflow.kernels.triton_ops.moe import align

    ids = torch.tensor([[3, 0], [3, 5], [0, 3], [7, 3]])
    rows, block_experts = align(ids, EXPERTS, 4)
    # the size is the bound for 8 choices over at most 8 experts, not what these fill
    assert rows.numel() == 8 + 8 * 3 and block_experts.numel() == rows.numel() // 4
    flat = ids.flatten()
    real = rows[rows < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # each choice once
    for block, expert in enumerate(block_experts.tolist()):
        choices = rows[block * 4:(block + 1) * 4]
        choices = choices[choices < flat.numel()]
        if expert < 0:
            assert choices.numel() == 0
        else:
            assert choices.numel() > 0 and (flat[choices] == expert).all()
    # experts 0 (2 rows), 3 (4), 5 (1), 7 (1): four blocks, in expert order, then none
    assert block_experts.tolist()[:5] == [0, 3, 5, 7, -1]
    assert rows[:2].tolist() == [1, 4]  # expert 0's choices, in token order


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [SiluAndMul, GeluTanhAndMul, ClampedSwiGLU])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("tokens,top_k,experts", [(1, 2, 8), (5, 1, 3), (37, 4, 8), (0, 2, 8)])
def test_kernel_matches_the_pytorch_path(dtype, activation, bias, tokens, top_k, experts):
    layer = layer_of(activation(), dtype, bias)
    weights, ids = routing(tokens, top_k, seed=tokens, experts=experts)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    expected = layer(x, weights, ids)
    attach_glue(torch.nn.ModuleList([layer]), cuda_ops())
    assert layer.routes_on_device
    actual = layer(x, weights, ids)
    assert actual.shape == expected.shape and actual.dtype == dtype
    if not tokens:
        return
    scale = expected.float().abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-4)
    else:
        # rounded where eager rounds: at most a last bit apart, where sums in another
        # order round the other way
        differ = (actual != expected).float().mean().item()
        torch.testing.assert_close(actual.float(), expected.float(), atol=2e-3 * scale,
                                   rtol=1e-2)
        assert differ < 0.05, f"{differ:.1%} of the elements differ"


def test_quantized_experts_and_other_devices_keep_the_pytorch_path(caplog):
    """The kernel takes experts in the activations' dtype only; a layer it turns down
    keeps its PyTorch path, and a graph is not offered it."""
    layer = FusedMoE(EXPERTS, HIDDEN, INNER, SiluAndMul(), quant_config=Int8Config())
    with caplog.at_level("WARNING"):
        attach_glue(torch.nn.ModuleList([layer]), cuda_ops())
    assert layer.plan is None and not layer.routes_on_device
    assert "not quantized ones" in caplog.text


def test_moe_model_on_triton_experts_replays_graphs_and_matches_transformers(
        checkpoint, hf_model):
    """A qwen3-moe engine with its experts, glue and attention on Triton's kernels (what
    CUDA runs) and its decode steps replayed through captured graphs, which the executor
    allows now that no expert layer reads its routing on the host; greedy, token for
    token with transformers."""
    from conftest import assert_greedy_matches, hf_greedy, random_prompts
    from test_cuda_graphs import CountingCapture

    from kvflow import LLM, SamplingParams
    from kvflow.worker.cuda_graphs import DecodeGraphs, why_not_captured

    path = checkpoint("qwen3-moe")
    llm = LLM(str(path), dtype="float32", device=DEVICE, kv_cache_memory="8MiB",
              enforce_eager=True, attention_backend="triton", max_num_seqs=4)
    runner = llm.engine.executor.runner
    model = runner.model
    cuda = torch.device("cuda")  # the rule graphs on CUDA follow
    assert why_not_captured(model, runner.backend, cuda) == \
        "expert layers read their routing on the host"  # the PyTorch path's loop
    attach_glue(model, cuda_ops())
    assert all(m.routes_on_device for m in model.modules() if isinstance(m, FusedMoE))
    assert why_not_captured(model, runner.backend, cuda) is None
    capture = CountingCapture()
    runner.graphs = DecodeGraphs(model, [1, 2, 4], runner.block_size, llm.engine.max_model_len,
                                 runner.device, capture)
    runner.graphs.capture_all()
    prompts = random_prompts(3, seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert capture.replays >= 7
    reference = [hf_greedy(hf_model(path), p, 8) for p in prompts]
    assert_greedy_matches([o.outputs[0].token_ids for o in outputs], reference, 8)
