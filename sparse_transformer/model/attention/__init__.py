"""Attention kinds behind one interface (``base.Attention``); ``model.network.attention`` names the kind."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparse_transformer.model.attention.adaptive_span import AdaptiveSpanAttention, AdaptiveSpanConfig
from sparse_transformer.model.attention.base import Attention, CannotDecode
from sparse_transformer.model.attention.performer import PerformerAttention, PerformerConfig
from sparse_transformer.model.attention.sparse import SparseAttention

if TYPE_CHECKING:
    from sparse_transformer.model.config import ModelConfig

KINDS: dict[str, type[Attention]] = {
    "sparse": SparseAttention,
    "performer": PerformerAttention,
    "adaptive_span": AdaptiveSpanAttention,
}


def build_attention(config: ModelConfig, seq_len: int, layer: int) -> Attention:
    """The attention of block ``layer`` on a sequence of ``seq_len`` positions (a level's length in an Hourglass)."""
    return KINDS[config.attention](config, seq_len, layer)


__all__ = ["KINDS", "AdaptiveSpanConfig", "Attention", "CannotDecode", "PerformerConfig", "build_attention"]
