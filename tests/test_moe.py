"""Mixture-of-experts models: the expert layer against a per-token loop and against
transformers' own modules, its loaders, and the MoE families' greedy tokens against
transformers, with forced router ties, a router that sends every token to the same
experts, chunked prefill, preemption and the engine's other features."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from checkpoints import MOE_VARIANTS
from conftest import (assert_greedy_matches, assert_no_leak, checkpoint_with,
                      chunked_and_preempted, generate_greedy, hf_greedy, prompt_logprobs,
                      random_prompts, without_decode_graphs)
from kvflow import LLM, SamplingParams, StructuredOutputsParams
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


MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Each family as its variant builds it, and the routing cases: experts 1 to 3 tied in every
# router, a first router that sends every token to the same experts, and Qwen3-MoE with
# its top-k weights left as the softmax gave them.
CASES = {**{family: (family, {}) for family in MOE_VARIANTS},
         "qwen3-moe-tied": ("qwen3-moe", {"routers": "tied"}),
         "olmoe-dead-router": ("olmoe", {"routers": "dead"}),
         "qwen3-moe-unnormalized": ("qwen3-moe", {"norm_topk_prob": False})}


def _expert_layers(llm: LLM) -> list[FusedMoE]:
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, FusedMoE)]


def _record_routing(llm: LLM) -> list[tuple[int, torch.Tensor]]:
    """(expert layer's index among the model's, expert ids [tokens, top_k]) of every call
    from now on."""
    calls = []
    for index, layer in enumerate(_expert_layers(llm)):
        layer.register_forward_pre_hook(
            lambda _, args, index=index: calls.append((index, args[2].clone())))
    return calls


@pytest.fixture(scope="module")
def references(checkpoint, hf_model):
    """Per case: its checkpoint, prompts past Mixtral's window, and transformers' greedy
    tokens."""
    made = {}
    for case, (variant, overrides) in CASES.items():
        path = checkpoint(variant, **overrides)
        prompts = random_prompts(6, seed=5, low=33, high=60)
        made[case] = path, prompts, [hf_greedy(hf_model(path), p, MAX_TOKENS) for p in prompts]
    return made


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["native", "eager"])
def test_greedy_matches_transformers(case, enforce_eager, references):
    """Natively, every expert layer runs the fused kernel, set to take experts with up to 2
    rows through its GEMV loops (decode steps) and larger ones through its GEMMs (prefill),
    whichever this machine measured faster."""
    path, prompts, reference = references[case]
    # the routing is watched through hooks, which a captured decode step passes by
    llm = without_decode_graphs(LLM(str(path), dtype="float32", device="cpu",
                                    kv_cache_memory="16MiB", enforce_eager=enforce_eager))
    for layer in _expert_layers(llm):
        assert (layer.plan is None) == enforce_eager
        if layer.plan is not None:
            layer.plan = replace(layer.plan, gemv_max_rows=2)
    calls = _record_routing(llm)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert_greedy_matches(tokens, reference, MAX_TOKENS)
    assert len({tuple(t) for t in tokens}) > 1
    num_experts = llm.engine.model_config.moe.num_experts
    # Decode steps leave experts without tokens in every case.
    assert any(ids.unique().numel() < num_experts for _, ids in calls)
    if case == "qwen3-moe-tied":  # the tie order chose among experts 1 to 3, many times
        chosen = torch.cat([ids for _, ids in calls])
        assert (torch.isin(chosen, torch.tensor([1, 2, 3])).sum(-1) == 1).sum() > 50
    if case == "olmoe-dead-router":  # the first expert layer sent every token to 3 experts
        first = torch.cat([ids for layer, ids in calls if layer == 0])
        assert first.unique().numel() == 3 and (first == first[0]).all()
    assert_no_leak(llm)


@pytest.mark.parametrize("family", MOE_VARIANTS)
def test_chunked_prefill_and_preemption(family, references):
    path, prompts, reference = references[family]
    llm, tokens = chunked_and_preempted(path, prompts, GREEDY)
    assert_greedy_matches(tokens, reference, MAX_TOKENS)
    assert_no_leak(llm)


def test_what_each_family_reads_changes_the_tokens(checkpoint, references):
    """The shared expert's gate, the dense layer Qwen3-MoE's mlp_only_layers asks for,
    Mixtral's window, OLMoE's top-3 and gpt-oss's SwiGLU limit, window and YaRN are not
    idle."""
    for family, override in [("qwen2-moe", {"shared_expert_intermediate_size": 16}),
                             ("qwen3-moe", {"mlp_only_layers": []}),
                             ("mixtral", {"sliding_window": None}),
                             ("olmoe", {"num_experts_per_tok": 2}),
                             ("gpt-oss", {"swiglu_limit": 7.0}),
                             ("gpt-oss", {"sliding_window": 64}),
                             ("gpt-oss", {"rope_parameters": {"rope_type": "default",
                                                              "rope_theta": 10000.0}})]:
        path, prompts, reference = references[family]
        _, tokens = generate_greedy(checkpoint(family, **override), prompts, GREEDY)
        assert tokens != reference, family


def test_stacked_checkpoint_and_a_missing_expert(references, tmp_path):
    """A checkpoint whose experts are stacked per projection, as transformers holds them
    (experts.gate_up_proj [experts, 2 * inner, hidden]), gives the same tokens; one that
    lacks an expert's tensor is refused, naming it."""
    path, prompts, reference = references["qwen3-moe"]
    tensors = load_file(path / "model.safetensors")
    stacked, missing = dict(tensors), dict(tensors)
    for layer in (0, 2):
        prefix = f"model.layers.{layer}.mlp.experts"
        per_expert = [[stacked.pop(f"{prefix}.{e}.{name}.weight") for e in range(8)]
                      for name in ("gate_proj", "up_proj", "down_proj")]
        gate, up, down = (torch.stack(tensors) for tensors in per_expert)
        stacked[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        stacked[f"{prefix}.down_proj"] = down
    del missing["model.layers.2.mlp.experts.5.up_proj.weight"]
    for name, contents in (("stacked", stacked), ("missing", missing)):
        checkpoint_with(path, tmp_path / name, contents)
    _, tokens = generate_greedy(tmp_path / "stacked", prompts, GREEDY)
    assert_greedy_matches(tokens, reference, MAX_TOKENS)
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*layers\.2\.mlp\.experts\."
                                         r"gate_up_proj\[up:5\]"):
        LLM(str(tmp_path / "missing"), device="cpu", kv_cache_memory="16MiB")


def test_batch_invariant(references):
    """Every expert's rows through the GEMV: a request's tokens and logprobs are bitwise
    the same alone and in a batch whose tokens spread over the experts otherwise."""
    path, prompts, _ = references["qwen3-moe"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="16MiB",
              batch_invariant=True)
    experts = _expert_layers(llm)
    assert experts and all(m.plan is not None and m.plan.gemv_max_rows > 10**9
                           for m in experts)
    alone = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0]
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                           use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == batched.outputs[0].token_ids
    assert alone.outputs[0].logprobs == batched.outputs[0].logprobs


def test_dense_draft_prefix_cache_and_structured_output(checkpoint, references):
    """A dense Qwen3 draft for a Qwen3-MoE target gives the target's greedy tokens; the
    prefix cache and a choice constraint work on an MoE model."""
    path, prompts, _ = references["qwen3-moe"]
    _, plain = generate_greedy(path, prompts[:3], GREEDY)
    llm, drafted = generate_greedy(path, prompts[:3], GREEDY, speculative_config={
        "model": str(checkpoint("qwen3")), "num_speculative_tokens": 2})
    assert drafted == plain
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="16MiB",
              enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=12, structured_outputs=(
        StructuredOutputsParams(choice=["yes", "no", "maybe"])))
    first = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0]
    assert first.outputs[0].text in ("yes", "no", "maybe")
    assert second.outputs[0].text == first.outputs[0].text
    assert second.num_cached_tokens > 0


@pytest.mark.parametrize("variant,override,message", [
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unimplemented_config_fields_are_refused_by_name(variant, override, message,
                                                         checkpoint):
    with pytest.raises(ValueError, match=message):
        LLM(str(checkpoint(variant, **override)), device="cpu", kv_cache_memory="16MiB")


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["native", "eager"])
@pytest.mark.parametrize("name,tolerance", [("int8", 0.2), ("int4", 1.5)])
def test_quantized_experts_stay_close_to_the_unquantized_model(checkpoint, name, tolerance,
                                                               enforce_eager):
    """A bf16 Qwen3-MoE (experts 64 wide, so that int4's groups of 32 fit them) quantized
    at load, experts and linear layers alike, against the same model unquantized, on the
    native path (the fused kernel on int8 or int4 experts) and the eager one (each expert
    dequantized); tolerances as the dense models' (tests/test_quantization.py), on each
    prompt's median token: quantizing moves a hidden state enough, now and then, to send a
    token to other experts, and that token's logprob far."""
    path = checkpoint("qwen3-moe", moe_intermediate_size=64, dtype="bfloat16")
    _, reference = prompt_logprobs(path, 4, kv_cache_memory="16MiB",
                                   enforce_eager=enforce_eager)
    llm, quantized = prompt_logprobs(path, 4, kv_cache_memory="16MiB",
                                     enforce_eager=enforce_eager, quantization=name,
                                     quantization_group_size=32)
    experts = _expert_layers(llm)
    assert experts and all(type(m.method).__name__ == f"Int{name[3]}ExpertMethod"
                           for m in experts)
    assert all((m.plan is None) == enforce_eager for m in experts)
    for q, r in zip(quantized, reference):
        assert (q - r).abs().median() < tolerance
        assert not torch.equal(q, r)  # the experts really were quantized
    assert_no_leak(llm)


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _to_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., rows, columns] -> (blocks [..., rows, columns / 32, 16] uint8, scales [...,
    rows, columns / 32] uint8, the values they hold), each block of 32 columns scaled by the
    power of two that fits its largest magnitude under 6, each value the nearest E2M1."""
    grouped = weight.float().unflatten(-1, (-1, 32))
    exponents = torch.ceil(torch.log2(grouped.abs().amax(-1) / 6)).clamp(-127, 127)
    scaled = grouped / torch.exp2(exponents)[..., None]
    codes = (scaled[..., None] - E2M1).abs().argmin(-1)
    blocks = (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8)
    values = (E2M1[codes] * torch.exp2(exponents)[..., None]).flatten(-2)
    return blocks, (exponents + 127).to(torch.uint8), values


def test_gpt_oss_mxfp4_experts(references, hf_model, tmp_path):
    """gpt-oss's experts as OpenAI publishes them (MXFP4 blocks and scales, each
    projection output-major) give transformers' greedy tokens on the float checkpoint
    holding the values they encode; a projection without its scales, or another
    quantization method, is refused by name."""
    path, prompts, _ = references["gpt-oss"]
    tensors = load_file(path / "model.safetensors")
    packed, decoded = dict(tensors), dict(tensors)
    for key, weight in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, values = _to_mxfp4(weight.transpose(1, 2))  # output-major
            del packed[key]
            packed[f"{key}_blocks"], packed[f"{key}_scales"] = blocks, scales
            decoded[key] = values.transpose(1, 2).contiguous()
    assert any(not torch.equal(decoded[k], tensors[k]) for k in tensors)
    quantized = checkpoint_with(path, tmp_path / "mxfp4", packed, {"quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}})
    reference = checkpoint_with(path, tmp_path / "decoded", decoded)
    expected = [hf_greedy(hf_model(reference), p, MAX_TOKENS) for p in prompts]
    _, tokens = generate_greedy(quantized, prompts, GREEDY)
    assert_greedy_matches(tokens, expected, MAX_TOKENS)
    del packed["model.layers.1.mlp.experts.down_proj_scales"]
    broken = checkpoint_with(path, tmp_path / "broken", packed, {"quantization_config": {
        "quant_method": "mxfp4"}})
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.down_proj_blocks without "
                                         r"model\.layers\.1\.mlp\.experts\.down_proj_scales"):
        LLM(str(broken), device="cpu", kv_cache_memory="16MiB")
    other = checkpoint_with(path, tmp_path / "fp8", tensors, {"quantization_config": {
        "quant_method": "fp8"}})
    with pytest.raises(ValueError, match="quant_method 'fp8' is not implemented"):
        LLM(str(other), device="cpu", kv_cache_memory="16MiB")
