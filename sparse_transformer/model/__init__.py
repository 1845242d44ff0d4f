"""The network: its config, the Transformer, attention kinds, patterns and kernels."""

from sparse_transformer.model.config import ModelConfig
from sparse_transformer.model.patterns import AttentionPattern
from sparse_transformer.model.transformer import Block, SparseTransformer

__all__ = ["AttentionPattern", "Block", "ModelConfig", "SparseTransformer"]
