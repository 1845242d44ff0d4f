"""Multi-head causal self-attention over a block-sparse pattern, with a pluggable backend."""

from __future__ import annotations

import torch
import torch.nn as nn

from sparse_transformer.all_attention import PersistentMemory
from sparse_transformer.kernels import BACKENDS, get_backend


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        nb = N // self.block_size
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
        # Patterns depend only on absolute positions, so a shorter sequence uses the top-left corner.
        attend = get_backend(self.backend, x.device)
        if self.memory is not None:
            y = self.memory.attend(attend, q, k, v)  # (B, H, N, D)
        else:
            y = attend(q, k, v, self.layout[:, :nb, :nb], self.block_size)  # (B, H, N, D)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))
