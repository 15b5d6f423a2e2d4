"""Mixture-of-experts models: the expert layer against a per-token loop and against
transformers' own modules, its loaders, and the MoE families' greedy tokens against
transformers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvflow.layers.activation import ClampedSwiGLU, SiluAndMul
from kvflow.layers.moe import FusedMoE, TopKRouter

HIDDEN, INNER, EXPERTS = 64, 32, 8


def _random_moe(bias: bool, activation: torch.nn.Module, seed: int = 0) -> FusedMoE:
    generator = torch.Generator().manual_seed(seed)
    layer = FusedMoE(EXPERTS, HIDDEN, INNER, activation, bias=bias)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return layer


def _per_token(layer: FusedMoE, x: torch.Tensor, weights: torch.Tensor,
               ids: torch.Tensor) -> torch.Tensor:
    """The naive reference: every token, every chosen expert, one at a time."""
    out = torch.zeros_like(x)
    for token in range(x.shape[0]):
        for weight, expert in zip(weights[token].tolist(), ids[token].tolist()):
            gate_up = F.linear(x[token], layer.gate_up_proj[expert],
                               None if layer.gate_up_proj_bias is None
                               else layer.gate_up_proj_bias[expert])
            y = F.linear(layer.act(gate_up), layer.down_proj[expert],
                         None if layer.down_proj_bias is None else layer.down_proj_bias[expert])
            out[token] += weight * y
    return out


def _ragged_choices(tokens: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Choices where expert 0 takes three tokens of four, experts 1 to 5 a few, and experts
    6 and 7 none."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for token in range(tokens):
        others = torch.randperm(5, generator=generator) + 1
        rows.append(torch.cat([torch.zeros(1, dtype=torch.long), others[:top_k - 1]])
                    if token < tokens * 3 // 4 else others[:top_k])
    return torch.rand(tokens, top_k, generator=generator), torch.stack(rows)


@pytest.mark.parametrize("bias,activation", [(False, SiluAndMul), (True, ClampedSwiGLU)],
                         ids=["silu", "clamped-swiglu-bias"])
@pytest.mark.parametrize("tokens", [1, 3, 37])
def test_expert_layer_matches_a_per_token_loop_on_ragged_groups(bias, activation, tokens):
    layer = _random_moe(bias, activation())
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1))
    weights, ids = _ragged_choices(tokens, 2, seed=tokens)
    assert set(ids.flatten().tolist()) <= set(range(6))
    expected = _per_token(layer, x, weights, ids)
    torch.testing.assert_close(layer(x, weights, ids), expected, rtol=1e-5, atol=1e-5)


def test_one_expert_taking_every_token():
    layer = _random_moe(False, SiluAndMul())
    x = torch.randn(20, HIDDEN, generator=torch.Generator().manual_seed(2))
    ids = torch.full((20, 1), 3)
    weights = torch.ones(20, 1)
    torch.testing.assert_close(layer(x, weights, ids), _per_token(layer, x, weights, ids))


def test_clamped_swiglu_and_biases_as_transformers_gpt_oss_experts():
    """gpt-oss's experts (transformers' module): interleaved gate/up columns, [hidden,
    2 * inner] and [inner, hidden] weights, biases; kvflow holds them as halves, by rows."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(hidden_size=HIDDEN, intermediate_size=INNER,
                          num_local_experts=EXPERTS, num_experts_per_tok=2)
    theirs = GptOssExperts(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in theirs.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    ours = FusedMoE(EXPERTS, HIDDEN, INNER, ClampedSwiGLU(config.swiglu_alpha,
                                                          config.swiglu_limit), bias=True)
    gate_up = theirs.gate_up_proj.transpose(1, 2)  # [experts, 2 * inner, hidden], interleaved
    for name, loaded, shard in [
            ("gate_up_proj", gate_up[:, ::2], "gate"), ("gate_up_proj", gate_up[:, 1::2], "up"),
            ("gate_up_proj_bias", theirs.gate_up_proj_bias[:, ::2], "gate"),
            ("gate_up_proj_bias", theirs.gate_up_proj_bias[:, 1::2], "up"),
            ("down_proj", theirs.down_proj.transpose(1, 2), None),
            ("down_proj_bias", theirs.down_proj_bias, None)]:
        param = getattr(ours, name)
        param.weight_loader(param, loaded, shard)
    x = torch.randn(29, HIDDEN, generator=generator) * 3  # past the clamp's limit
    weights, ids = _ragged_choices(29, 2, seed=4)
    with torch.no_grad():
        expected = theirs(x, ids, weights)
    torch.testing.assert_close(ours(x, weights, ids), expected, rtol=1e-4, atol=1e-4)


def test_per_expert_and_stacked_tensors_load_alike():
    """One expert's projection at a time (safetensors), each projection of every expert
    (GGUF's stacked ffn_gate_exps), or the whole parameter (transformers' gate_up_proj)."""
    source = _random_moe(False, SiluAndMul(), seed=5)
    gate, up = source.gate_up_proj.split(INNER, dim=1)
    per_expert = FusedMoE(EXPERTS, HIDDEN, INNER, SiluAndMul())
    stacked = FusedMoE(EXPERTS, HIDDEN, INNER, SiluAndMul())
    whole = FusedMoE(EXPERTS, HIDDEN, INNER, SiluAndMul())
    for expert in range(EXPERTS):
        for shard, tensor in [("gate", gate), ("up", up)]:
            per_expert.gate_up_proj.weight_loader(per_expert.gate_up_proj, tensor[expert],
                                                  f"{shard}:{expert}")
        per_expert.down_proj.weight_loader(per_expert.down_proj, source.down_proj[expert],
                                           f"down:{expert}")
    stacked.gate_up_proj.weight_loader(stacked.gate_up_proj, gate, "gate")
    stacked.gate_up_proj.weight_loader(stacked.gate_up_proj, up, "up")
    for layer in (stacked, whole):
        layer.down_proj.weight_loader(layer.down_proj, source.down_proj, None)
    whole.gate_up_proj.weight_loader(whole.gate_up_proj, source.gate_up_proj, None)
    for layer in (per_expert, stacked, whole):
        assert torch.equal(layer.gate_up_proj, source.gate_up_proj)
        assert torch.equal(layer.down_proj, source.down_proj)
    with pytest.raises(ValueError, match="expert 8 of a layer of 8"):
        whole.down_proj.weight_loader(whole.down_proj, source.down_proj[0], "down:8")
    with pytest.raises(ValueError, match="shape"):
        whole.gate_up_proj.weight_loader(whole.gate_up_proj, source.down_proj[0], "gate:1")


def _router(scoring: str, renormalize: bool, seed: int = 6) -> TopKRouter:
    router = TopKRouter(HIDDEN, EXPERTS, 3, scoring, renormalize)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, HIDDEN,
                                        generator=torch.Generator().manual_seed(seed)))
        router.weight[4] = router.weight[2]  # experts 2, 4 and 6 tie on every token
        router.weight[6] = router.weight[2]
    return router


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_router_as_transformers_with_ties(renormalize):
    """The same experts and weights as transformers' Qwen3-MoE router, ties included."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    ours = _router("softmax", renormalize)
    theirs = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS,
                                               num_experts_per_tok=3,
                                               norm_topk_prob=renormalize))
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    x = torch.randn(200, HIDDEN, generator=torch.Generator().manual_seed(7))
    weights, ids = ours.route(x)
    _, their_weights, their_ids = theirs(x)
    tied = (ids.unsqueeze(-1) == torch.tensor([2, 4, 6])).any(-1).sum(-1)
    assert ((tied > 0) & (tied < 3)).sum() > 10  # the tie decided which expert was taken
    assert torch.equal(ids, their_ids)
    assert torch.equal(weights, their_weights)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(200))


@pytest.mark.parametrize("renormalize", [False, True])
def test_sigmoid_router(renormalize):
    router = _router("sigmoid", renormalize)
    x = torch.randn(50, HIDDEN, generator=torch.Generator().manual_seed(8))
    weights, ids = router.route(x)
    scores = torch.sigmoid(x @ router.weight.T)
    expected = scores.topk(3, dim=-1)
    assert torch.equal(ids, expected.indices)
    values = expected.values
    torch.testing.assert_close(weights, values / values.sum(-1, keepdim=True) if renormalize
                               else values)


def test_router_refuses_what_it_cannot_route():
    with pytest.raises(ValueError, match="scoring 'softmax_topk'"):
        TopKRouter(HIDDEN, EXPERTS, 2, "softmax_topk", False)
    with pytest.raises(ValueError, match="top_k=9 of 8 experts"):
        TopKRouter(HIDDEN, EXPERTS, 9, "softmax", False)
