"""Sparse Transformer: long-sequence autoregressive models with block-sparse attention."""
