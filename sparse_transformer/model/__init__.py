"""The network: its config, the Transformer, attention kinds, patterns and kernels."""

from sparse_transformer.model.attention import AdaptiveSpan, Performer, Sparse
from sparse_transformer.model.config import AttentionKind, ModelConfig
from sparse_transformer.model.hourglass_spec import HourglassConfig
from sparse_transformer.model.patterns import AttentionPattern
from sparse_transformer.model.transformer import Block, SparseTransformer

__all__ = [
    "AdaptiveSpan", "AttentionKind", "AttentionPattern", "Block", "HourglassConfig", "ModelConfig", "Performer", "Sparse",
    "SparseTransformer",
]  # fmt: skip
