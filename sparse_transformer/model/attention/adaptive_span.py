"""Adaptive attention span (Sukhbaatar et al. 2019): every head learns how far back it needs to look.

Head h has a span z_h in [0, max_span]; the attention weight to a key x positions back is multiplied by the
soft ramp m(x) = clamp((R + z - x) / R, 0, 1) and renormalised, so z gets a gradient from the keys on the
ramp, and a penalty ``penalty * mean_h z_h`` per layer (added to the loss) pulls spans down. Keys beyond
the longest current span, max_h z_h + R, have weight 0 in every head and are not computed at all: queries
run in chunks against only the keys within reach, so cost falls as the spans shrink.

The span composes with the attention pattern: it multiplies on top of the pattern's allowed keys (the
tiles of the layout, causal within the diagonal tiles), so a strided head keeps its column keys only as
far back as its span reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from sparse_transformer.model.attention.base import Attention
from sparse_transformer.model.config import AttentionKind, ConfigError, ModelConfig


@dataclass(frozen=True)
class AdaptiveSpan(AttentionKind):
    """A learned span per head on top of the pattern: ``attention: {class_path: AdaptiveSpan, init_args: {max_span: 256}}``.

    Args:
        max_span: S, the longest span a head can learn (keys further back are never seen).
        ramp: R, length of the soft ramp over which a key's weight falls from 1 to 0.
        init: initial span as a fraction of ``max_span`` (the paper starts at 0: only the ramp is seen).
        penalty: coefficient of the span penalty, ``penalty * mean span`` per layer, in positions.
        chunk_size: queries per chunk; each chunk sees chunk_size + current span keys.
    """

    max_span: int = 1024
    ramp: int = 32
    init: float = 0.0
    penalty: float = 2e-6
    chunk_size: int = 64
    name: ClassVar[str] = "adaptive_span"

    def __post_init__(self) -> None:
        for name in ("max_span", "ramp", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"adaptive_span {name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.init <= 1:
            raise ConfigError(f"adaptive_span init={self.init} must be a fraction of max_span in [0, 1]")
        if self.penalty < 0:
            raise ConfigError(f"adaptive_span penalty={self.penalty} must be >= 0")

    def build(self, config: ModelConfig, seq_len: int, layer: int) -> AdaptiveSpanAttention:
        return AdaptiveSpanAttention(config, seq_len, layer)


def ramp_mask(span: torch.Tensor, distance: torch.Tensor, ramp: int) -> torch.Tensor:
    """m(x) = clamp((R + z - x) / R, 0, 1) for spans ``(H,)`` and key distances x ``(n, w)``: ``(H, n, w)``."""
    return ((ramp + span[:, None, None] - distance) / ramp).clamp(0, 1)


class AdaptiveSpanAttention(Attention):
    """Multi-head causal attention with a learned span per head, on top of the pattern's layout."""

    def __init__(self, config: ModelConfig, seq_len: int, layer: int):
        super().__init__(config)
        self.options, self.block_size = config.attention, config.pattern.block_size
        self.span_fraction = nn.Parameter(torch.full((config.n_heads,), float(self.options.init)))  # z / max_span
        self.layout = config.pattern.layout(config.n_heads, seq_len, layer)  # for the full context

    def spans(self) -> torch.Tensor:
        """Current spans z ``(H,)`` in positions, in [0, max_span]."""
        return self.options.max_span * self.span_fraction.clamp(0, 1)

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Keep the parameter in [0, 1] after an optimizer step (as the paper does), so it never sticks outside."""
        self.span_fraction.clamp_(0, 1)

    def auxiliary_loss(self) -> torch.Tensor:
        """The span penalty: ``penalty`` x mean span, in positions."""
        return self.options.penalty * self.spans().mean()

    def metrics(self, name: str) -> dict[str, float]:
        return {f"span/{name}/head{h}": z for h, z in enumerate(self.spans().tolist())}

    def window(self, n: int) -> int:
        """Keys each query can reach: distances 0 .. max_h z_h + R - 1, at most the sequence."""
        return min(n, math.ceil(self.spans().max().item()) + self.options.ramp)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: None) -> torch.Tensor:
        N = q.shape[2]
        span = self.spans()
        pos = torch.arange(N, device=q.device)
        out = []
        for a, b, start in self._chunks(N):
            qi, kj = pos[a:b], pos[start:b]
            distance = qi[:, None] - kj[None, :]  # (n, w)
            bs, last = self.block_size, (b - 1) // self.block_size
            tiles = self.layout.grid(range(a // bs, last + 1), range(start // bs, last + 1)).to(q.device)  # the window's
            allowed = tiles[:, qi // bs - a // bs][:, :, kj // bs - start // bs] & (distance >= 0)  # (H, n, w)
            scores = q[:, :, a:b] @ k[:, :, start:b].transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, n, w)
            attn = torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1)
            attn = attn * ramp_mask(span, distance, self.options.ramp)  # m(0) = 1: the diagonal always stays
            attn = attn / attn.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            out.append(attn.to(v.dtype) @ v[:, :, start:b])  # (B, H, n, D)
        return torch.cat(out, dim=2)  # (B, H, N, D)

    def _chunks(self, n: int) -> list[tuple[int, int, int]]:
        """Query chunks ``[a, b)`` and the first key each reaches: keys before it are out of every head's span."""
        width, chunk = self.window(n), self.options.chunk_size
        return [(a, min(a + chunk, n), max(0, a - width + 1)) for a in range(0, n, chunk)]

    def attention_flops(self, n: int) -> float:
        """QK^T and AV of every chunk over the keys within the longest current span: cost falls with the spans."""
        head_dim = self.qkv.in_features // self.n_heads
        return self.n_heads * sum(2 * 2 * head_dim * (b - a) * (b - start) for a, b, start in self._chunks(n))

