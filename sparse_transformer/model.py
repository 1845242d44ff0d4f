"""The Sparse Transformer (Child et al. 2019): a decoder-only Transformer over bytes with sparse attention."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparse_transformer.adaptive_span import AdaptiveSpanAttention, AdaptiveSpanConfig
from sparse_transformer.attention import AttentionKind, check_attention, make_attention
from sparse_transformer.patterns import AttentionPattern
from sparse_transformer.performer import PerformerAttention, PerformerConfig


class PositionalEmbedding(nn.Module):
    """Learned positions, factorized over the axes of ``shape`` and summed (section 5.1).

    ``shape=(N,)`` is the usual 1-D table; ``(rows, cols, channels)`` gives images one small table per
    axis, so position (r, c, ch) of a raster-ordered image costs rows + cols + channels vectors, not N.
    """

    def __init__(self, shape: tuple[int, ...], d_model: int):
        super().__init__()
        self.shape = tuple(shape)
        self.tables = nn.ParameterList(nn.Parameter(torch.randn(n, d_model) * 0.01) for n in self.shape)
        strides = [math.prod(self.shape[a + 1 :]) for a in range(len(self.shape))]
        self.register_buffer("strides", torch.tensor(strides), persistent=False)

    def forward(self, n: int) -> torch.Tensor:
        pos = torch.arange(n, device=self.strides.device)
        coords = (pos.unsqueeze(1) // self.strides) % torch.tensor(self.shape, device=pos.device)  # (N, axes)
        return sum(table[coords[:, a]] for a, table in enumerate(self.tables))  # (N, C)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-activation residual block (section 5.2): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        layout: torch.Tensor,
        block_size: int,
        backend: str,
        attention: AttentionKind = "sparse",
        performer: PerformerConfig = PerformerConfig(),
        adaptive_span: AdaptiveSpanConfig = AdaptiveSpanConfig(),
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = make_attention(attention, d_model, n_heads, layout, block_size, backend, performer, adaptive_span)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class SparseTransformer(nn.Module):
    """Bytes ``[B, N]`` -> next-byte logits ``[B, N, vocab_size]``.

    Args:
        seq_len: context length N; positions beyond it have no embedding.
        shape: axes of the factorized positional embedding (product must be ``seq_len``); None for 1-D.
        recompute: recompute each block's activations in the backward pass instead of storing them,
            trading about a third more compute for memory that no longer grows with depth.
        attention: ``sparse`` (the pattern, computed by ``backend``), ``performer`` (FAVOR+, dense pattern
            only) or ``adaptive_span`` (learned spans on top of the pattern); options in ``performer`` and
            ``adaptive_span``.
    """

    def __init__(
        self,
        seq_len: int,
        vocab_size: int = 256,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        ffn_mult: float = 4.0,
        dropout: float = 0.0,
        pattern: AttentionPattern = AttentionPattern(),
        backend: str = "auto",
        shape: tuple[int, ...] | None = None,
        recompute: bool = False,
        attention: AttentionKind = "sparse",
        performer: PerformerConfig = PerformerConfig(),
        adaptive_span: AdaptiveSpanConfig = AdaptiveSpanConfig(),
    ):
        super().__init__()
        shape = tuple(shape) if shape else (seq_len,)
        if math.prod(shape) != seq_len:
            raise ValueError(f"positional shape {list(shape)} does not multiply to seq_len={seq_len}")
        pattern.check(seq_len)
        check_attention(attention, pattern, backend)
        self.seq_len, self.block_size, self.recompute = seq_len, pattern.block_size, recompute
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = PositionalEmbedding(shape, d_model)
        self.drop = nn.Dropout(dropout)
        d_ff = int(ffn_mult * d_model)
        self.blocks = nn.ModuleList(
            Block(
                d_model,
                n_heads,
                d_ff,
                dropout,
                pattern.layout(n_heads, seq_len, layer),
                pattern.block_size,
                backend,
                attention,
                performer,
                adaptive_span,
            )
            for layer in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        # Residual projections start small so the sum over 2 * n_layers branches keeps unit scale (section 5.2).
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, N = idx.shape
        if N > self.seq_len:
            raise ValueError(f"sequence of {N} tokens is longer than the model's context seq_len={self.seq_len}")
        # Tiles must be whole: pad on the right, which causal attention never sees from the left.
        pad = -N % self.block_size
        x = self.embed(F.pad(idx, (0, pad))) + self.pos(N + pad)  # (B, N', C)
        x = self.drop(x)
        for block in self.blocks:
            if self.recompute and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x))[:, :N]  # (B, N, vocab)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def auxiliary_loss(self) -> torch.Tensor:
        """Sum of the adaptive-span penalties (0 without any), to be added to the training loss."""
        penalties = [m.span_penalty() for m in self.modules() if isinstance(m, AdaptiveSpanAttention)]
        return torch.stack(penalties).sum() if penalties else self.head.weight.new_zeros(())

    def before_train_step(self, step: int) -> None:
        """Per-step upkeep, called before training step ``step``: FAVOR+ redraws its features when due,
        adaptive spans return to [0, max_span] after the previous optimizer step."""
        for m in self.modules():
            if isinstance(m, PerformerAttention):
                m.maybe_redraw(step)
            elif isinstance(m, AdaptiveSpanAttention):
                m.clamp_spans()
