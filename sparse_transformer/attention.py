"""Multi-head causal self-attention over a block-sparse pattern, with a pluggable backend.

``make_attention`` picks a block's attention module from ``model.attention``: this block-sparse
attention (``sparse``), FAVOR+ (``performer``) or adaptive span (``adaptive_span``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from sparse_transformer.adaptive_span import AdaptiveSpanAttention, AdaptiveSpanConfig
from sparse_transformer.all_attention import PersistentMemory
from sparse_transformer.errors import InputError
from sparse_transformer.kernels import BACKENDS, get_backend
from sparse_transformer.kv_cache import BlockKVCache
from sparse_transformer.patterns import AttentionPattern
from sparse_transformer.performer import PerformerAttention, PerformerConfig


class CausalSelfAttention(nn.Module):
    """Self-attention whose heads attend only to the tiles of ``layout``.

    The backend (triton, blocks, flex, reference, or auto) computes the same function; it is chosen at
    each call from the input's device when ``auto``, so a model moves between CPU and GPU freely.
    ``persistent_memory`` > 0 joins that many learned key/value vectors per head to every softmax
    (``sparse_transformer.all_attention``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        layout: torch.Tensor,
        block_size: int,
        backend: str = "auto",
        persistent_memory: int = 0,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.n_heads, self.block_size, self.backend = n_heads, block_size, backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.register_buffer("layout", layout, persistent=False)  # (H, NB, NB) for the full context
        self.memory = (
            PersistentMemory(n_heads, d_model // n_heads, persistent_memory, layout, block_size) if persistent_memory else None
        )

    def forward(self, x: torch.Tensor, cache: BlockKVCache | None = None) -> torch.Tensor:
        """Attend over ``x`` from position 0; with a ``cache``, also store its keys and values (prefill)."""
        B, N, C = x.shape
        nb = N // self.block_size
        q, k, v = self._heads(x)
        if cache is not None:
            if self.memory is not None:
                cache.write(*self.memory.keys_values(B, k.dtype), 0)
            cache.write(k, v, self._offset)
        # Patterns depend only on absolute positions, so a shorter sequence uses the top-left corner.
        attend = get_backend(self.backend, x.device)
        if self.memory is not None:
            y = self.memory.attend(attend, q, k, v)  # (B, H, N, D)
        else:
            y = attend(q, k, v, self.layout[:, :nb, :nb], self.block_size)  # (B, H, N, D)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))

    def decode(self, x: torch.Tensor, cache: BlockKVCache, pos: int) -> torch.Tensor:
        """One new position ``x`` ``[B, 1, C]`` at ``pos``, attending through the cache."""
        q, k, v = self._heads(x)
        cache.write(k, v, pos + self._offset)
        return self.proj(cache.attend(q, pos + self._offset).transpose(1, 2).reshape(x.shape))

    def new_cache(self) -> BlockKVCache:
        """An empty cache for this layer; persistent memory sits in it as the leading key blocks."""
        return BlockKVCache(self.layout if self.memory is None else self.memory.layout, self.block_size)

    @property
    def _offset(self) -> int:
        """Cache position of context position 0: after the persistent vectors."""
        return 0 if self.memory is None else self.memory.n_memory

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        return self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, D) each


AttentionKind = Literal["sparse", "performer", "adaptive_span"]


def check_attention(attention: str, pattern: AttentionPattern, backend: str, persistent_memory: int) -> None:
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
    if attention != "sparse" and persistent_memory:
        raise InputError(
            f"persistent_memory={persistent_memory} joins the block-sparse softmax; attention={attention!r} has none "
            "(use attention: sparse, or persistent_memory: 0)"
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
    persistent_memory: int = 0,
) -> nn.Module:
    """The attention module of one block; every kind maps ``(B, N, C) -> (B, N, C)``."""
    if attention == "performer":
        return PerformerAttention(d_model, n_heads, performer)
    if attention == "adaptive_span":
        return AdaptiveSpanAttention(d_model, n_heads, layout, block_size, adaptive_span)
    return CausalSelfAttention(d_model, n_heads, layout, block_size, backend, persistent_memory)
