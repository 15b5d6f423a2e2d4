"""The roofline: the fastest a run could go on this machine, and how close it came.

Defined once here (and in docs/benchmarks.md):
- bytes: every forward step reads all weights once (a tied embedding counted once), and
  every decode token reads its request's KV cache so far. In a mixture of experts a step
  reads the experts its tokens reach: k per token alone, and of E experts, with k chosen
  per token at random (as random router weights choose), E(1 - (1 - k/E)^tokens) expected
  for a step of that many tokens (a prefill's reach them all);
- FLOPs per processed token: 2 x the non-embedding parameters it uses (k experts of each
  expert layer, in a mixture of experts), plus attention
  4 x heads x head_dim x layers x the tokens it attends, plus the LM head (2 x hidden x
  vocab) only for tokens whose logits are computed (one per generated token);
- ceilings: the DRAM read rate over a 2 GiB tensor and the 2048^3 matmul rate in the run's
  dtype, at the run's thread count (kvflow.bench.hardware).
A run can go no faster than its FLOPs at the matmul rate nor than its bytes at the read
rate; the larger of the two times binds, and achieved % is that time over the run's time.

The schedule is the workload's, not the system's, so that every system on a workload is
held to the same bound: a single-stream workload runs one request at a time; the others
run all requests at once (each wave of `concurrency` requests costs one weight read per
step of its longest output).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class ModelCost:
    """Per-token and per-step costs of one model, from its config.json fields. In a mixture
    of experts, `weight_bytes` and `non_embedding_params` leave the routed experts out:
    `expert_bytes` and `expert_params` are one expert's, summed over the expert layers."""

    weight_bytes: int
    non_embedding_params: int  # those every token uses
    attention_flops_per_attended_token: int
    lm_head_flops: int
    kv_bytes_per_token: int
    expert_bytes: int = 0
    expert_params: int = 0
    num_experts: int = 0
    experts_per_token: int = 0

    @classmethod
    def from_config(cls, config: dict, dtype_bytes: int = 2,
                    kv_dtype_bytes: int | None = None) -> "ModelCost":
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        layers = config["num_hidden_layers"]
        vocab = config["vocab_size"]
        q, kv = heads * head_dim, kv_heads * head_dim
        per_layer = hidden * q + 2 * hidden * kv + q * hidden + 2 * hidden
        if config.get("model_type") in ("qwen2", "qwen2_moe"):
            per_layer += q + 2 * kv  # q, k and v biases, none on o
        elif config.get("attention_bias"):
            per_layer += q + 2 * kv + hidden
        if config.get("model_type") in ("gemma2", "gemma3_text"):
            per_layer += 2 * hidden  # the norms after attention and after the MLP
        if config.get("model_type") in ("qwen3", "gemma3_text", "qwen3_moe"):
            per_layer += 2 * head_dim  # q_norm and k_norm
        elif config.get("model_type") == "olmoe":
            per_layer += q + kv  # q_norm and k_norm across all heads
        gpt_oss = config.get("model_type") == "gpt_oss"
        if gpt_oss:
            per_layer += heads  # the attention sinks
        experts = config.get("num_experts") or config.get("num_local_experts") or 0
        sparse = _sparse_layers(config, layers) if experts else 0
        dense_mlp = 3 * hidden * config["intermediate_size"]
        if config.get("mlp_bias"):
            dense_mlp += 2 * config["intermediate_size"] + hidden
        expert_width = config.get("moe_intermediate_size") or config["intermediate_size"]
        shared = config.get("shared_expert_intermediate_size") or 0
        # An expert layer's router and shared expert (with its gate) every token uses.
        sparse_fixed = hidden * experts + (3 * hidden * shared + hidden if shared else 0)
        expert_params = sparse * 3 * hidden * expert_width
        if gpt_oss:  # the router's bias, and each expert's on its projections
            sparse_fixed += experts
            expert_params += sparse * (2 * expert_width + hidden)
        non_embedding = (layers * per_layer + (layers - sparse) * dense_mlp
                         + sparse * sparse_fixed + hidden)  # + the final norm
        top_k = (config.get("num_experts_per_tok") or 0) if experts else 0
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
        return cls(weight_bytes=(non_embedding + embeddings) * dtype_bytes,
                   non_embedding_params=non_embedding + top_k * expert_params,
                   attention_flops_per_attended_token=4 * heads * head_dim * layers,
                   lm_head_flops=2 * hidden * vocab,
                   kv_bytes_per_token=2 * layers * kv * (kv_dtype_bytes or dtype_bytes),
                   expert_bytes=expert_params * dtype_bytes, expert_params=expert_params,
                   num_experts=experts, experts_per_token=top_k)

    def active_experts(self, tokens: int) -> float:
        """Experts of each expert layer a step of `tokens` tokens is expected to read."""
        if not self.num_experts or tokens < 1:
            return 0.0
        return self.num_experts * (1 - (1 - self.experts_per_token / self.num_experts) ** tokens)

    def step_weight_bytes(self, tokens: int) -> float:
        """The weights one step of `tokens` tokens reads."""
        return self.weight_bytes + self.expert_bytes * self.active_experts(tokens)


def _sparse_layers(config: dict, layers: int) -> int:
    """Layers with experts: every layer, but for Qwen's mlp_only_layers, and only every
    decoder_sparse_step-th (as kvflow/models/moe.py reads them)."""
    dense = set(config.get("mlp_only_layers") or ())
    step = config.get("decoder_sparse_step") or 1
    return sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)


@dataclass(frozen=True)
class RunCost:
    flops: float
    bytes: float


def run_cost(model: ModelCost, lengths: Sequence[tuple[int, int]],
             concurrency: int, shared_prefix_len: int = 0) -> RunCost:
    """Cost of serving (prompt_len, output_len) requests in waves of `concurrency`.

    A request processes prompt_len + output_len - 1 tokens (the last generated token is
    never fed back); the token at position p attends p + 1 tokens. A prefix that every
    request shares is computed once, by the first: the least work any system can do, with
    or without a prefix cache."""
    flops = bytes_read = 0.0
    for index, (prompt_len, output_len) in enumerate(lengths):
        processed = prompt_len + output_len - 1
        reused = min(shared_prefix_len, prompt_len - 1) if index else 0
        flops += ((processed - reused) * 2 * model.non_embedding_params
                  + model.attention_flops_per_attended_token
                  * (processed * (processed + 1) - reused * (reused + 1)) / 2
                  + output_len * model.lm_head_flops)
        decode_steps = output_len - 1
        attended = decode_steps * prompt_len + decode_steps * (decode_steps + 1) / 2
        bytes_read += attended * model.kv_bytes_per_token
    for first in range(0, len(lengths), concurrency):
        wave = lengths[first:first + concurrency]
        # The wave's first step computes its prompts; each later one a token per request
        # still generating (which matters only to the experts it reaches).
        tokens = [sum(prompt_len for prompt_len, _ in wave)] + [
            sum(1 for _, output_len in wave if output_len > step)
            for step in range(1, max(output_len for _, output_len in wave))]
        bytes_read += sum(model.step_weight_bytes(n) for n in tokens)
    return RunCost(flops=flops, bytes=bytes_read)


def step_cost(model: ModelCost, num_tokens: int, num_attended: int, num_context_tokens: int,
              num_logits: int) -> RunCost:
    """Cost of one engine step, by the same rules as a run's: all weights read once, each
    request's KV read once (num_context_tokens, its cached tokens and the step's own), and
    the FLOPs of the tokens computed, the positions they attend and the logits sampled."""
    return RunCost(flops=(num_tokens * 2 * model.non_embedding_params
                          + num_attended * model.attention_flops_per_attended_token
                          + num_logits * model.lm_head_flops),
                   bytes=(model.step_weight_bytes(num_tokens)
                          + num_context_tokens * model.kv_bytes_per_token))


@dataclass(frozen=True)
class Roofline:
    compute_seconds: float
    memory_seconds: float
    binding: str
    achieved_percent: float
    flops: float
    bytes: float
    matmul_flops_per_s: float
    dram_bytes_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def roofline(cost: RunCost, seconds: float, matmul_flops_per_s: float,
             dram_bytes_per_s: float) -> Roofline:
    compute = cost.flops / matmul_flops_per_s
    memory = cost.bytes / dram_bytes_per_s
    return Roofline(compute_seconds=compute, memory_seconds=memory,
                    binding="compute" if compute >= memory else "memory",
                    achieved_percent=100 * max(compute, memory) / seconds,
                    flops=cost.flops, bytes=cost.bytes, matmul_flops_per_s=matmul_flops_per_s,
                    dram_bytes_per_s=dram_bytes_per_s)
