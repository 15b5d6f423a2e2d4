"""The roofline: the fastest a run could go on this machine, and how close it came.

Defined once here (and in docs/benchmarks.md):
- bytes: every forward step reads all weights once (a tied embedding counted once), and
  every decode token reads its request's KV cache so far;
- FLOPs per processed token: 2 x the non-embedding parameters, plus attention
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
    """Per-token and per-step costs of one model, from its config.json fields."""

    weight_bytes: int
    non_embedding_params: int
    attention_flops_per_attended_token: int
    lm_head_flops: int
    kv_bytes_per_token: int

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
        per_layer = (hidden * q + 2 * hidden * kv + q * hidden
                     + 3 * hidden * config["intermediate_size"] + 2 * hidden)
        if config.get("model_type") == "qwen2":
            per_layer += q + 2 * kv  # q, k and v biases, none on o
        elif config.get("attention_bias"):
            per_layer += q + 2 * kv + hidden
        if config.get("mlp_bias"):
            per_layer += 2 * config["intermediate_size"] + hidden
        if config.get("model_type") in ("gemma2", "gemma3_text"):
            per_layer += 2 * hidden  # the norms after attention and after the MLP
        if config.get("model_type") in ("qwen3", "gemma3_text"):
            per_layer += 2 * head_dim  # q_norm and k_norm
        non_embedding = layers * per_layer + hidden  # + the final norm
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
        return cls(weight_bytes=(non_embedding + embeddings) * dtype_bytes,
                   non_embedding_params=non_embedding,
                   attention_flops_per_attended_token=4 * heads * head_dim * layers,
                   lm_head_flops=2 * hidden * vocab,
                   kv_bytes_per_token=2 * layers * kv * (kv_dtype_bytes or dtype_bytes))


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
        bytes_read += max(output_len for _, output_len in wave) * model.weight_bytes
    return RunCost(flops=flops, bytes=bytes_read)


def step_cost(model: ModelCost, num_tokens: int, num_attended: int, num_context_tokens: int,
              num_logits: int) -> RunCost:
    """Cost of one engine step, by the same rules as a run's: all weights read once, each
    request's KV read once (num_context_tokens, its cached tokens and the step's own), and
    the FLOPs of the tokens computed, the positions they attend and the logits sampled."""
    return RunCost(flops=(num_tokens * 2 * model.non_embedding_params
                          + num_attended * model.attention_flops_per_attended_token
                          + num_logits * model.lm_head_flops),
                   bytes=model.weight_bytes + num_context_tokens * model.kv_bytes_per_token)


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
