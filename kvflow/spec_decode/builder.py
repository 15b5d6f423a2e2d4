"""Builds the speculator an engine's --speculative-config asks for."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvflow.attention.base import AttentionBackend
from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.ngram import NgramProposer
from kvflow.spec_decode.proposer import Proposer, Speculator

if TYPE_CHECKING:
    from kvflow.engine.llm_engine import LLMEngine


def build_speculator(config: SpeculativeConfig, engine: LLMEngine, num_blocks: int,
                     backend: AttentionBackend) -> Speculator:
    """The target engine is built up to its runner: the draft shares its block tables."""
    proposer: Proposer
    if config.method == "ngram":
        assert config.prompt_lookup_min is not None and config.prompt_lookup_max is not None
        proposer = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min,
                                 config.prompt_lookup_max)
    else:
        from kvflow.spec_decode.draft_model import DraftModelProposer

        proposer = DraftModelProposer.build(config, engine, num_blocks, backend)
    return Speculator(config, proposer, engine.cache_config.block_size)
