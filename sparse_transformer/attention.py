"""Multi-head causal self-attention over a block-sparse pattern, with a pluggable backend.

``make_attention`` picks a block's attention module from ``model.attention``: this block-sparse
attention (``sparse``), FAVOR+ (``performer``) or adaptive span (``adaptive_span``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from sparse_transformer.adaptive_span import AdaptiveSpanAttention, AdaptiveSpanConfig
from sparse_transformer.errors import InputError
from sparse_transformer.kernels import BACKENDS, get_backend
from sparse_transformer.patterns import AttentionPattern
from sparse_transformer.performer import PerformerAttention, PerformerConfig


class CausalSelfAttention(nn.Module):
    """Self-attention whose heads attend only to the tiles of ``layout``.

    The backend (triton, blocks, flex, reference, or auto) computes the same function; it is chosen at
    each call from the input's device when ``auto``, so a model moves between CPU and GPU freely.
    """

    def __init__(self, d_model: int, n_heads: int, layout: torch.Tensor, block_size: int, backend: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.n_heads, self.block_size, self.backend = n_heads, block_size, backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.register_buffer("layout", layout, persistent=False)  # (H, NB, NB) for the full context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        nb = N // self.block_size
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
        # Patterns depend only on absolute positions, so a shorter sequence uses the top-left corner.
        attend = get_backend(self.backend, x.device)
        y = attend(q, k, v, self.layout[:, :nb, :nb], self.block_size)  # (B, H, N, D)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


AttentionKind = Literal["sparse", "performer", "adaptive_span"]


def check_attention(attention: str, pattern: AttentionPattern, backend: str) -> None:
    """Refuse combinations that make no sense, in one line naming the values."""
    if attention not in ("sparse", "performer", "adaptive_span"):
        raise InputError(f"model.attention={attention!r} is not one of sparse, performer, adaptive_span")
    if attention != "sparse" and backend != "auto":
        raise InputError(
            f"model.backend={backend!r} picks a block-sparse kernel, which attention={attention!r} does not use; "
            "leave backend: auto"
        )
    if attention == "performer" and pattern.kind != "dense":
        raise InputError(
            f"attention='performer' is global causal linear attention; pattern.kind={pattern.kind!r} cannot "
            "restrict it (use pattern.kind: dense)"
        )


def make_attention(
    attention: AttentionKind,
    d_model: int,
    n_heads: int,
    layout: torch.Tensor,
    block_size: int,
    backend: str,
    performer: PerformerConfig,
    adaptive_span: AdaptiveSpanConfig,
) -> nn.Module:
    """The attention module of one block; every kind maps ``(B, N, C) -> (B, N, C)``."""
    if attention == "performer":
        return PerformerAttention(d_model, n_heads, performer)
    if attention == "adaptive_span":
        return AdaptiveSpanAttention(d_model, n_heads, layout, block_size, adaptive_span)
    return CausalSelfAttention(d_model, n_heads, layout, block_size, backend)
