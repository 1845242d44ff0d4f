"""The all-attention layer (Sukhbaatar et al. 2019, "Augmenting Self-attention with Persistent Memory").

Each head gets M learned key/value vectors that every query sees, joined to the context keys in the same
softmax; with them the block drops its feed-forward sublayer, since attention over the persistent vectors
plays its part (a softmax over fixed keys followed by a weighted sum of fixed values is a feed-forward
layer). Here the persistent vectors ride through the ordinary block-sparse backends unchanged: they are
prepended as M extra leading key positions, M a multiple of the block size, so they fill whole leading
key-block columns that every real query row computes in full (off-diagonal tiles are never masked), and M
zero query rows are prepended to keep q, k, v the same length; their outputs are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
import torch
import torch.nn as nn

from sparse_transformer.model.config import ModelConfig
from sparse_transformer.model.layout import BlockLayout


def memory_layout(layout: BlockLayout, n_memory_blocks: int) -> BlockLayout:
    """H heads of NB blocks -> of m + NB blocks: m leading key-block columns seen by every real query block.

    The top-left m x m corner (the dummy query rows) is causal with its diagonal, so the layout stays a
    valid causal layout for every backend; the old layout sits in the lower-right corner, shifted by whole
    blocks, so its diagonal tiles keep their element-wise causal mask.
    """
    H, nb, m = layout.n_heads, layout.n_blocks, n_memory_blocks
    R = m + nb
    head = torch.arange(H)[:, None]
    dummy_rows, dummy_cols = (t.flatten() for t in torch.tril_indices(m, m))  # the m x m causal corner
    real = torch.arange(m, R)
    old = layout.row_ids()
    rows = torch.cat([
        (head * R + dummy_rows).flatten(),
        (head * R + real.repeat_interleave(m)).flatten(),  # every real row reads the m memory blocks
        old // nb * R + m + old % nb,
    ])  # fmt: skip
    cols = torch.cat([dummy_cols.repeat(H), torch.arange(m).repeat(H * nb), m + layout.indices.long()])
    return BlockLayout.from_rows(H, R, rows, cols)


class PersistentMemory(nn.Module):
    """M persistent key/value vectors per head, attended to in the same softmax as the context.

    Stored at the paper's initial scale (keys N(0, 1/d_head), values N(0, 1/M)) and multiplied by
    sqrt(d_head) and sqrt(M) in use, as in the paper.
    """

    def __init__(self, config: ModelConfig, layout: BlockLayout):
        super().__init__()
        H, M, D = config.n_heads, config.attention.persistent_memory, config.head_dim
        self.n_memory, self.block_size = M, config.pattern.block_size
        self.keys = nn.Parameter(torch.randn(H, M, D) / math.sqrt(D))  # (H, M, D)
        self.values = nn.Parameter(torch.randn(H, M, D) / math.sqrt(M))  # (H, M, D)
        # Built once for the full context; a shorter sequence uses its top-left corner, which is exactly the
        # extension of the shorter layout.
        self.layout = memory_layout(layout, M // self.block_size)

    def keys_values(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The persistent keys and values at their scale in use, ``(B, H, M, D)`` each."""
        H, M, D = self.keys.shape
        keys = (self.keys * math.sqrt(D)).to(dtype).expand(batch, H, M, D)
        return keys, (self.values * math.sqrt(M)).to(dtype).expand(batch, H, M, D)

    def attend(self, attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``attend`` (any backend) over [memory; context] for q, k, v ``(B, H, N, D)``; returns ``(B, H, N, D)``."""
        B, H, N, D = q.shape
        M = self.n_memory
        mem_k, mem_v = self.keys_values(B, k.dtype)
        q = torch.cat([q.new_zeros(B, H, M, D), q], dim=2)  # (B, H, M + N, D)
        k = torch.cat([mem_k, k], dim=2)
        v = torch.cat([mem_v, v], dim=2)
        n = (M + N) // self.block_size
        return attend(q, k, v, self.layout.crop(n), self.block_size)[:, :, M:]  # (B, H, N, D)
