"""Hourglass (Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient Language Models").

The flat stack of blocks becomes a U-Net over the sequence: some blocks at full length, then the sequence
shortened by k, more blocks on the short sequence (which may shorten again), then upsampled back, added to
the activations from before the shortening, and more blocks at full length. The hierarchy is written in the
paper's notation, ``layers@factor`` from input to output, the factor counted from the input length:
``"2@1 4@3 2@1"`` is 2 blocks at full length, 4 on the sequence shortened 3x, 2 at full length again;
``"1@1 2@2 4@8 2@2 1@1"`` nests a level shortened 4x more inside one shortened 2x.

Causality across the boundaries follows the paper: before pooling groups of k, the sequence is shifted right
by k - 1, so shortened token g summarizes positions g*k - k + 1 ... g*k and full-length position i, which
receives token floor(i / k) on the way up, sees nothing after itself. Lengths that k does not divide are
padded on the right (the future, which nothing attends to), as is a shortened sequence to whole attention
blocks; the attention pattern of a shortened level counts positions of that level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_transformer.model.config import ModelConfig

RunBlock = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def shortened_len(n: int, k: int, block_size: int) -> int:
    """Length of the level below one of length ``n``: ceil(n / k), padded to whole attention blocks."""
    return math.ceil(math.ceil(n / k) / block_size) * block_size


class Shortening(nn.Module):
    """``(B, n, C)`` -> ``(B, ceil(n / k) padded to block_size, C)``: shift right by k - 1, pool groups of k."""

    def __init__(self, k: int, config: ModelConfig):
        super().__init__()
        C, options = config.d_model, config.hourglass
        self.k, self.block_size = k, config.pattern.block_size
        self.proj = nn.Linear(k * C, C) if options.pooling == "linear" else None
        self.attn = WindowAttention(config) if options.attention_resampling else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, C = x.shape
        k, m = self.k, math.ceil(n / self.k)
        # Shift right by k - 1 (zeros enter on the left): group g holds positions g*k - k + 1 ... g*k. The
        # m = ceil(n / k) groups that upsampling reads end at position (m - 1) * k <= n - 1.
        groups = F.pad(x, (0, 0, k - 1, 0))[:, : m * k].view(B, m, k, C)  # (B, m, k, C)
        s = groups.mean(2) if self.proj is None else self.proj(groups.flatten(2))  # (B, m, C)
        if self.attn is not None:
            s = s + self.attn(s, groups)
        return F.pad(s, (0, 0, 0, -s.shape[1] % self.block_size))  # (B, m', C)

    def flops(self, n: int) -> float:
        """Forward FLOPs on a sequence of ``n``: the pooling projection and the window attention, per group."""
        m = math.ceil(n / self.k)
        pool = 0 if self.proj is None else 2.0 * self.proj.weight.numel() * m
        return pool + (0 if self.attn is None else self.attn.flops(m, self.k))


class Upsampling(nn.Module):
    """``(B, m, C)`` -> ``(B, n, C)``: full-length position i gets shortened token floor(i / k)."""

    def __init__(self, k: int, config: ModelConfig):
        super().__init__()
        C, options = config.d_model, config.hourglass
        self.k = k
        self.proj = nn.Linear(C, k * C) if options.upsampling == "linear" else None
        self.attn = CausalCrossAttention(config, k) if options.attention_resampling else None

    def forward(self, s: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Upsampled ``s`` plus ``residual`` ``(B, n, C)``, the activations from before the shortening."""
        B, m, C = s.shape
        n = residual.shape[1]
        if self.proj is None:
            up = s.repeat_interleave(self.k, dim=1)  # (B, m*k, C)
        else:
            up = self.proj(s).view(B, m * self.k, C)  # slot j of token g goes to position g*k + j
        x = up[:, :n] + residual
        if self.attn is not None:
            x = x + self.attn(x, s)
        return x

    def flops(self, n: int, m: int) -> float:
        """Forward FLOPs from ``m`` shortened tokens back to ``n`` positions."""
        project = 0 if self.proj is None else 2.0 * self.proj.weight.numel() * m
        return project + (0 if self.attn is None else self.attn.flops(n, m))


class WindowAttention(nn.Module):
    """Each pooled token attends to the k positions it pools (all at or before its last one)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model)
        self.mha = nn.MultiheadAttention(config.d_model, config.n_heads, batch_first=True)

    def forward(self, s: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        B, m, k, C = groups.shape
        q = self.norm(s).reshape(B * m, 1, C)
        kv = self.norm(groups).reshape(B * m, k, C)
        return self.mha(q, kv, kv, need_weights=False)[0].view(B, m, C)

    def flops(self, m: int, k: int) -> float:
        """m queries, each over its k keys: query and output projections per query, key/value ones per key."""
        return _attention_flops(self.mha.embed_dim, queries=m, keys=m * k, pairs=m * k)


class CausalCrossAttention(nn.Module):
    """Full-length position i attends to shortened tokens 0 ... floor(i / k). Dense: O(n * n / k)."""

    def __init__(self, config: ModelConfig, k: int):
        super().__init__()
        self.k = k
        self.norm_q, self.norm_kv = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.mha = nn.MultiheadAttention(config.d_model, config.n_heads, batch_first=True)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        n, m = x.shape[1], s.shape[1]
        blocked = torch.arange(m, device=x.device)[None, :] > torch.arange(n, device=x.device)[:, None] // self.k
        kv = self.norm_kv(s)
        return self.mha(self.norm_q(x), kv, kv, attn_mask=blocked, need_weights=False)[0]  # (B, n, C)

    def flops(self, n: int, m: int) -> float:
        """n queries over all m keys (the mask hides the future, the product is dense)."""
        return _attention_flops(self.mha.embed_dim, queries=n, keys=m, pairs=n * m)


def _attention_flops(C: int, queries: int, keys: int, pairs: int) -> float:
    """nn.MultiheadAttention: q and out projections (C x C) per query, k and v (C x 2C) per key, QK^T and AV per pair."""
    return 2.0 * (2 * C * C * queries + 2 * C * C * keys + 2 * C * pairs)


class Hourglass(nn.Module):
    """One level of the hierarchy: blocks, then (shorten, the level below, upsample + residual), then blocks.

    ``make_block(seq_len, layer)`` builds the block for a level of that (padded) length, ``layer`` counting
    blocks from the input, so patterns that alternate by layer keep alternating through the hierarchy.
    """

    def __init__(
        self,
        config: ModelConfig,
        seq_len: int,
        make_block: Callable[[int, int], nn.Module],
        levels: list[tuple[int, int]] | None = None,
        first_layer: int = 0,
    ):
        super().__init__()
        levels = config.hourglass.levels if levels is None else levels
        (n_pre, factor), (n_post, _) = levels[0], levels[-1]
        self.seq_len = seq_len
        layer = first_layer
        self.pre = nn.ModuleList(make_block(seq_len, layer + i) for i in range(n_pre))
        layer += n_pre
        self.shorten = self.inner = self.upsample = None
        if len(levels) > 1:
            inner = levels[1:-1]
            k = inner[0][1] // factor
            self.shorten = Shortening(k, config)
            short = shortened_len(seq_len, k, config.pattern.block_size)
            self.inner = Hourglass(config, short, make_block, inner, layer)
            self.upsample = Upsampling(k, config)
            layer += sum(n for n, _ in inner)
            self.post = nn.ModuleList(make_block(seq_len, layer + i) for i in range(n_post))
        else:
            self.post = nn.ModuleList()

    def forward(self, x: torch.Tensor, run: RunBlock) -> torch.Tensor:
        """``x`` ``(B, n, C)``, n a multiple of the block size; ``run(block, x)`` applies one block."""
        for block in self.pre:
            x = run(block, x)
        if self.inner is not None:
            s = self.inner(self.shorten(x), run)  # (B, m', C)
            x = self.upsample(s, x)  # (B, n, C)
        for block in self.post:
            x = run(block, x)
        return x

    def blocks(self) -> Iterator[nn.Module]:
        """Every block of the hierarchy, from the input to the output."""
        yield from self.pre
        if self.inner is not None:
            yield from self.inner.blocks()
        yield from self.post

    def flops(self, n: int) -> float:
        """Forward FLOPs on a sequence of ``n`` (a multiple of the block size): each level at its own length."""
        total = sum(block.flops(n) for block in [*self.pre, *self.post])
        if self.inner is not None:
            m = shortened_len(n, self.shorten.k, self.shorten.block_size)
            total += self.shorten.flops(n) + self.inner.flops(m) + self.upsample.flops(n, m)
        return total

