"""Small random checkpoints saved by transformers, for tests.

transformers' default initialisation makes greedy decoding repeat one token, which
proves little; weights are drawn with std 2/sqrt(fan_in) instead so that outputs vary.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from kvflow.demo import train_tokenizer

VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
# For the same tokenizer: lists tools, renders assistant tool calls and tool results in the
# hermes format (Qwen2.5's and Qwen3's), and takes Qwen3's enable_thinking.
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}<|system|>Tools: {{ tools | tojson }}<|end|>{% endif %}"
    "{%- for m in messages %}<|{{ m['role'] }}|>"
    "{%- if m['role'] == 'tool' %}<tool_response>{{ m['content'] }}</tool_response>"
    "{%- else %}{{ m['content'] or '' }}{% endif %}"
    "{%- for call in m['tool_calls'] or [] %}<tool_call>{\"name\": \""
    "{{ call['function']['name'] }}\", \"arguments\": "
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{%- else %}{{ call['function']['arguments'] | tojson }}{% endif %}}</tool_call>"
    "{%- endfor %}<|end|>{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "The quick brown fox jumps over the lazy dog. Hello world, hello kvflow!",
    "import os\nimport sys\nprint('hello', sys.argv)\n",
]


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    tokenizer = train_tokenizer(CORPUS * 20, VOCAB_SIZE, SPECIAL_TOKENS, CHAT_TEMPLATE)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            eos_token_id=0, bos_token_id=0, pad_token_id=0)

VARIANTS: dict[str, dict] = {
    "llama-gqa": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "llama-mha-tied-bias": dict(model_type="llama", architectures=["LlamaForCausalLM"],
                                num_key_value_heads=4, tie_word_embeddings=True,
                                attention_bias=True),
    "llama3-rope": dict(model_type="llama", architectures=["LlamaForCausalLM"],
                        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                         "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}),
    "llama-linear-rope": dict(model_type="llama", architectures=["LlamaForCausalLM"],
                              rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                               "factor": 2.0}),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                  tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32),
    "mistral-window": dict(model_type="mistral", architectures=["MistralForCausalLM"],
                           sliding_window=12),
    # Odd head counts, a query_pre_attn_scalar other than head_dim, caps the random weights'
    # scores and logits pass, a window shorter than most prompts on every other layer.
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"],
                   hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                   query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
                   final_logit_softcapping=20.0, sliding_window=12,
                   layer_types=["sliding_attention", "full_attention"]),
    # Five local layers per global one, each kind with its RoPE (the global one scaled).
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                   num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=12,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"],
                   rope_parameters={
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                       "full_attention": {"rope_type": "linear", "factor": 2.0,
                                          "rope_theta": 1000000.0}}),
    # LongRoPE switching past 32 positions, over half of each head (Phi-4-mini's partial
    # rotary); the checkpoint stores qkv_proj and gate_up_proj fused.
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"],
                 original_max_position_embeddings=32,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.5,
                                  "original_max_position_embeddings": 32,
                                  "short_factor": [1.0, 1.5, 2.0, 3.0],
                                  "long_factor": [2.0, 4.0, 8.0, 16.0]}),
    # Mixtures of experts. Qwen3-MoE: a dense layer between two with experts
    # (mlp_only_layers), renormalized top-k. Qwen2-MoE: experts every other layer
    # (decoder_sparse_step), a shared expert under its gate, top-k not renormalized.
    # Mixtral: experts everywhere, always renormalized, a window shorter than most prompts.
    # OLMoE: q/k norms across all heads, top-3 of 8 experts.
    "qwen3-moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                      num_hidden_layers=3, head_dim=32, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=True),
    "qwen2-moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                      num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      decoder_sparse_step=2, norm_topk_prob=False),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"],
                    intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=12),
    "olmoe": dict(model_type="olmoe", architectures=["OlmoeForCausalLM"], intermediate_size=32,
                  num_experts=8, num_experts_per_tok=3, norm_topk_prob=False),
    # gpt-oss: a window shorter than most prompts on its first layer, full attention on the
    # second, sinks, YaRN past 128 positions, a SwiGLU limit the random weights reach.
    "gpt-oss": dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], head_dim=16,
                    intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                    sliding_window=12, swiglu_limit=3.0, attention_bias=True,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                     "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False,
                                     "original_max_position_embeddings": 128}),
}
MOE_VARIANTS = ("qwen3-moe", "qwen2-moe", "mixtral", "olmoe", "gpt-oss")


def _set_routers(model: torch.nn.Module, routers: str) -> None:
    """'tied': in every router, experts 2 and 3 score as expert 1 does, so that which of
    them a token takes is top-k's tie order. 'dead': the first router scores every expert
    0 for every token, so that its layer sends all tokens to the same top-k experts (the
    tie order's first) and none to the others."""
    gates = [layer.mlp.gate.weight for layer in model.model.layers
             if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        if routers == "tied":
            for weight in gates:
                weight[2:4] = weight[1]
        elif routers == "dead":
            gates[0].zero_()
        else:
            raise ValueError(f"routers={routers!r}")


def _scale_weights(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                std = 2.0 / math.sqrt(param.shape[-1])
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            else:  # norm weights: around 1
                param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.1)


def build_checkpoint(out_dir: Path, variant: str, seed: int = 0, dtype: str = "float32",
                     max_shard_size: str | None = None, routers: str | None = None,
                     **overrides) -> Path:
    """routers: a mixture of experts' routers set to force ties ('tied', 'dead': see
    _set_routers); None leaves them random."""
    fields = {**BASE, **VARIANTS[variant], **overrides}
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _scale_weights(model, seed)
    if routers is not None:
        _set_routers(model, routers)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    build_tokenizer(out_dir)
    return out_dir
