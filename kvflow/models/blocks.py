"""The building blocks family files compose: attention with RoPE over the paged KV cache,
the gated MLP, the experts that replace it in mixture-of-experts layers, and the
causal-LM shell (embedding, LM head, logits).

Module names follow Hugging Face checkpoints (`self_attn.qkv_proj`, `mlp.down_proj`, ...),
so that a checkpoint tensor finds its parameter by name; `prefix` is a layer's full name,
which a quantization config may choose the layer's method by.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar, TypeVar

import torch
from torch import nn

from kvflow.attention.metadata import AttentionMetadata
from kvflow.distributed.pipeline import Carry, MissingLayer
from kvflow.distributed.tensor_parallel import COLUMN, ROW, current
from kvflow.layers.embedding import VocabParallelEmbedding
from kvflow.layers.activation import ACTIVATIONS, ClampedSwiGLU
from kvflow.layers.attention import PagedAttention
from kvflow.layers.linear import Linear, MergedLinear
from kvflow.layers.moe import FusedMoE, TopKRouter
from kvflow.layers.moe_placement import HostExperts, expert_device
from kvflow.layers.norm import RMSNorm
from kvflow.layers.rotary import RotaryEmbedding
from kvflow.models.config import ModelConfig
from kvflow.quantization.base import QuantizationConfig, QuantizedPlan
from kvflow.quantization.unquantized import LinearPlan, apply_linear

T = TypeVar("T")


class Attention(nn.Module):
    """Fused QKV projection, optional per-head q/k norm, RoPE, paged attention, output
    projection."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding,
                 quant_config: QuantizationConfig | None, prefix: str,
                 norm: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        replicas = config.kv_head_replicas
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size},
                                     bias=config.qkv_bias, quant_config=quant_config,
                                     prefix=f"{prefix}.qkv_proj", split=COLUMN,
                                     replicas={"k": replicas, "v": replicas})
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_bias,
                             quant_config=quant_config, prefix=f"{prefix}.o_proj", split=ROW)
        # Per head (Qwen3, Gemma 3), or across all heads at once (OLMoE).
        q_width, k_width = ((q_size, kv_size) if config.qk_norm_all_heads
                            else (config.head_dim, config.head_dim))
        self.q_norm = norm(q_width, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = norm(k_width, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(config.num_heads, config.num_kv_heads, config.head_dim,
                                   config.sliding_windows[layer_idx], config.scale,
                                   config.attn_logit_softcap, config.attention_sinks)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.q_norm.weight.shape[0]))
            k = self.k_norm(k.reshape(-1, self.k_norm.weight.shape[0]))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, meta, self.rotary).flatten(1))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up in one fused projection."""

    def __init__(self, config: ModelConfig, quant_config: QuantizationConfig | None,
                 prefix: str, size: int | None = None) -> None:
        """size: the width between the projections (None: the config's intermediate_size)."""
        super().__init__()
        size = size or config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": size, "up": size},
                                         bias=config.mlp_bias, quant_config=quant_config,
                                         prefix=f"{prefix}.gate_up_proj", split=COLUMN)
        self.down_proj = Linear(size, config.hidden_size, bias=config.mlp_bias,
                                quant_config=quant_config, prefix=f"{prefix}.down_proj",
                                split=ROW)
        self.act = ACTIVATIONS[config.hidden_act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """The experts in place of the MLP: the router (`gate`) picks each token's experts,
    whose outputs are summed with its weights; with a shared expert (Qwen2-MoE), every
    token also takes that MLP, scaled by a sigmoid gate of its own."""

    def __init__(self, config: ModelConfig, layer_idx: int,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        moe = config.moe
        assert moe is not None, "an expert layer in a model without a MoeConfig"
        self.gate = TopKRouter(config.hidden_size, moe.num_experts, moe.top_k, moe.scoring,
                               moe.norm_topk_prob, moe.router_bias, prefix=f"{prefix}.gate")
        activation = (ClampedSwiGLU(moe.swiglu_alpha, moe.swiglu_limit)
                      if moe.swiglu_limit is not None else ACTIVATIONS[config.hidden_act]())
        # Placed experts (kvflow/layers/moe_placement.py) are made where they will run.
        device = expert_device(layer_idx)
        self.host = HostExperts(device) if device is not None else None
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.experts = FusedMoE(moe.num_experts, config.hidden_size,
                                    moe.intermediate_size, activation, moe.expert_bias,
                                    quant_config=quant_config, prefix=f"{prefix}.experts")
        if moe.shared_expert_size:
            self.shared_expert = GatedMLP(config, quant_config, f"{prefix}.shared_expert",
                                          moe.shared_expert_size)
            # Kept in the model's dtype, as the router is: it scales a whole MLP's output.
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False,
                                             prefix=f"{prefix}.shared_expert_gate")
        else:
            self.shared_expert = self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate.route(x)
        staged = self.host.stage(x, weights, ids) if self.host is not None else None
        # Queued before the placed experts wait for their inputs, so that it overlaps them.
        shared = (torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
                  if self.shared_expert is not None else None)
        out = (self.host.run(self.experts, staged, x.device) if staged is not None
               else self.experts(x, weights, ids))
        out = self.experts.tp.all_reduce(out)  # each rank's experts hold part of the width
        return out if shared is None else out + shared


def feed_forward(config: ModelConfig, layer_idx: int, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module:
    """A layer's MLP: its experts where the model has them at this layer, else the dense
    gated MLP."""
    if config.moe is not None and config.moe.sparse_layers[layer_idx]:
        return SparseMoeBlock(config, layer_idx, quant_config, prefix)
    return GatedMLP(config, quant_config, prefix)


def rotary_embeddings(config: ModelConfig, max_positions: int) -> list[RotaryEmbedding]:
    """Each layer's rotary embedding; layers with the same RoPE share one table."""
    tables: dict[object, RotaryEmbedding] = {}
    rotary_dim = config.rotary_dim or config.head_dim
    for layer in range(config.num_layers):
        rope = config.rope_of(layer)
        if rope not in tables:
            tables[rope] = RotaryEmbedding(rotary_dim, max_positions, rope)
    return [tables[config.rope_of(layer)] for layer in range(config.num_layers)]


def decoder_layers(config: ModelConfig, build: Callable[[int], nn.Module]) -> nn.ModuleList:
    """The decoder's layers, each built by `build(index)` where this rank holds it (a
    pipeline stage holds a range; kvflow/distributed/pipeline.py)."""
    held = config.held_layers
    return nn.ModuleList(build(i) if i in held else MissingLayer()
                         for i in range(config.num_layers))


def final_norm(config: ModelConfig, build: Callable[[], nn.Module]) -> nn.Module:
    return build() if config.last_stage else MissingLayer()


def run_decoder(layers: nn.ModuleList, norm: nn.Module, x: torch.Tensor | Carry,
                meta: AttentionMetadata) -> torch.Tensor | Carry:
    """The decoder layers this rank holds over the embedded tokens (or the previous
    pipeline stage's carry), then the final norm (or, before the last stage, the carry for
    the next). Each layer returns (its output, the residual stream before it), so that
    each residual add is fused with the norm after it."""
    residual = None
    if isinstance(x, Carry):
        x, residual = x.hidden, x.residual
    for layer in layers:
        if not isinstance(layer, MissingLayer):
            x, residual = layer(x, residual, meta)
    if isinstance(norm, MissingLayer):
        return Carry(x, residual)
    return norm(x, residual)[0]


def embedding(config: ModelConfig) -> nn.Module:
    """The token embedding, where this rank uses it: on the first pipeline stage, and on
    the last where the LM head is tied to it."""
    if not (config.first_stage or (config.last_stage and config.tie_word_embeddings)):
        return MissingLayer()
    if current().size > 1:
        return VocabParallelEmbedding(config.vocab_size, config.hidden_size)
    return nn.Embedding(config.vocab_size, config.hidden_size,
                        _weight=torch.empty(config.vocab_size, config.hidden_size))


class CausalLM(nn.Module):
    """A decoder (`self.model`, whose `embed_tokens` is the embedding) under an LM head.

    Family files subclass it: build the decoder, then call `init_head`."""

    # checkpoint projection name -> (fused module's name, shard); Llama's layout by default
    packed_modules: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }
    # an expert's checkpoint projection name -> gate, up or down (kvflow/layers/moe.py)
    expert_projections: ClassVar[dict[str, str]] = {}

    config: ModelConfig
    model: nn.Module

    @classmethod
    def checkpoint_tensors(cls, tensors: Iterable[tuple[str, T]]) -> Iterator[tuple[str, T]]:
        """A checkpoint's (name, tensor) pairs under the names and in the layouts kvflow's
        modules give them; a family whose checkpoints lay tensors out otherwise (gpt-oss's
        experts) overrides this."""
        return iter(tensors)

    def init_head(self, config: ModelConfig,
                  lm_head_quant_config: QuantizationConfig | None) -> None:
        """lm_head_quant_config: the LM head's format (None: the model's dtype). A tied
        head in another format is a second copy of the embedding."""
        self.config = config
        # Under tensor parallelism each rank holds a slice of the vocabulary's rows (the
        # embedding's too) and the logits are gathered.
        self.tp = current()
        self.lm_head: nn.Module | None
        if not config.last_stage:
            self.lm_head = MissingLayer()
        elif config.tie_word_embeddings and lm_head_quant_config is None:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, self.tp.rows_of(config.vocab_size)[1],
                                  bias=False, quant_config=lm_head_quant_config,
                                  prefix="lm_head", split=COLUMN)
        # The plan of the embedding as a tied head (an untied head is a Linear with its
        # own); chosen by kvflow.kernels.tuning.
        self.lm_head_plan: LinearPlan | None = None

    def forward(self, input_ids: torch.Tensor | None, meta: AttentionMetadata,
                carry: Carry | None = None) -> torch.Tensor | Carry:
        """-> hidden states [num_tokens, hidden_size] (logits are computed only where
        needed); on a pipeline stage after the first, from the carry the one before handed
        it, and before the last, the carry for the next."""
        return self.model(input_ids, meta, carry)

    @property
    def tied_head_weight(self) -> torch.Tensor | None:
        """The embedding where it is the LM head's weight (or what a head in another format
        was made from), else None."""
        tied = self.config.tie_word_embeddings and self.config.last_stage
        return self.model.embed_tokens.weight if tied else None

    def start_step(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                   rows: torch.Tensor) -> Callable[[], torch.Tensor]:
        """A step's forward pass and the logits at `rows` of the flat batch, returned by
        the callable (here at once; a pipeline's first stage returns before the last has
        computed them: kvflow/executor/multiproc.py)."""
        logits = self.logits_at(self(input_ids, meta), rows)
        return lambda: logits

    def logits_at(self, hidden: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """The logits of hidden[rows] (the runner names rows, so that other tensor-parallel
        ranks, which hold the same hidden states, can compute their part alongside)."""
        if isinstance(rows, torch.Tensor) and not rows.numel():  # a step that samples nothing
            return hidden.new_empty((0, self.config.vocab_size))
        return self.compute_logits(hidden[rows])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.gather_columns(self._project(hidden), self.config.vocab_size)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's product. A tied head in another format runs the rows its
        small-batch kernel takes; larger batches multiply the embedding it was made from,
        which costs less than dequantizing the copy."""
        head = self.lm_head
        plan = head.plan if head is not None else None
        if head is not None and not (self.config.tie_word_embeddings
                                     and isinstance(plan, QuantizedPlan)
                                     and hidden.shape[0] > plan.small_max_rows):
            return head(hidden)
        return apply_linear(hidden, self.model.embed_tokens.weight, None, self.lm_head_plan)

    def attention_layers(self) -> list[PagedAttention]:
        return [m for m in self.modules() if isinstance(m, PagedAttention)]
