"""How a family's models are laid out in GGUF files as llama.cpp's converter
(convert_hf_to_gguf.py) writes them: its architecture name, the reader of its metadata,
the names of its tensors, and the changes the converter made to their values.

A family file registers one `GgufLayout` beside its Hugging Face architecture
(kvflow/models/registry.py); kvflow/models/gguf/ reads a file through the layout of its
`general.architecture`, so that a new family adds a layout, not branches in the reader.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvflow.models.config import ModelConfig
    from kvflow.models.gguf.file import GgufFile

# llama.cpp's name of a decoder layer's tensor (`blk.N.<name>.weight`) -> the module of
# the Hugging Face checkpoint it was converted from, for Llama's decoder layer: its
# attention and norms, and its MLP (which the mixture-of-experts families replace).
ATTENTION_TENSORS: Mapping[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
}
LLAMA_TENSORS: Mapping[str, str] = {
    **ATTENTION_TENSORS,
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's names of an expert layer's tensors (kvflow/layers/moe.py), alike in every
# family: the router, each projection of every expert stacked ([experts, rows, columns]),
# and Qwen2-MoE's shared expert with its gate.
EXPERT_TENSORS = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
                  "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
# The routers, which kvflow keeps in the model's dtype whatever the file's type (a rounded
# score can change which experts a token reaches); llama.cpp keeps them F32.
ROUTER_TENSORS = ("ffn_gate_inp", "ffn_gate_inp_shexp")


def expert_tensors(feed_forward: str, projections: Mapping[str, str],
                   shared_expert: bool = False) -> dict[str, str]:
    """llama.cpp's expert-layer tensors -> the checkpoint modules they load into, for a
    model whose experts sit under `feed_forward` (Qwen's mlp, Mixtral's block_sparse_moe)
    with `projections` naming each expert's gate, up and down (its model class's
    expert_projections). A stacked tensor's module is the projection's name without an
    expert index (`mlp.experts.gate_proj`), which kvflow's loader takes as every expert's
    (kvflow/models/loader.py)."""
    names = {role: name for name, role in projections.items()}
    tensors = {"ffn_gate_inp": f"{feed_forward}.gate"}
    tensors.update({f"ffn_{role}_exps": f"{feed_forward}.experts.{names[role]}"
                    for role in ("gate", "up", "down")})
    if shared_expert:
        tensors.update({"ffn_gate_inp_shexp": f"{feed_forward}.shared_expert_gate",
                        **{f"ffn_{role}_shexp": f"{feed_forward}.shared_expert.{role}_proj"
                           for role in ("gate", "up", "down")}})
    return tensors
# The tensors outside the layers, alike in every family.
GLOBAL_TENSORS: Mapping[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


@dataclass(frozen=True)
class GgufLayout:
    architecture: str  # llama.cpp's general.architecture
    # The file's metadata (and the tensors it holds) as the model's config; the family's
    # reader builds on kvflow/models/gguf/config.py's read_gguf_config.
    read_config: Callable[[GgufFile], ModelConfig]
    layer_tensors: Mapping[str, str] = field(default_factory=lambda: LLAMA_TENSORS)
    # What the converter added to every norm weight (Gemma's, which the model multiplies
    # by 1 + w, are stored as 1 + w); the loader takes it off again.
    norm_shift: float = 0.0
    # The converter interleaves the rotary halves of each q/k head for llama.cpp's
    # pairwise rotary (Llama only; the others use the rotate-half rotary kvflow does).
    permuted_qk: bool = False
    # Whether the family's files have experts. llama.cpp writes Mixtral under Llama's name
    # ("llama"); of two families registered under one name, a file with
    # `{architecture}.expert_count` above 0 is read by the one with experts.
    has_experts: bool = False
