"""The Sparse Transformer (Child et al. 2019): a decoder-only Transformer over bytes with sparse attention."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparse_transformer.adaptive_span import AdaptiveSpanAttention, AdaptiveSpanConfig
from sparse_transformer.all_attention import check_persistent_memory
from sparse_transformer.attention import AttentionKind, check_attention, make_attention
from sparse_transformer.errors import InputError
from sparse_transformer.hourglass import Hourglass, HourglassConfig
from sparse_transformer.kv_cache import BlockKVCache
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

    def forward(self, n: int, start: int = 0) -> torch.Tensor:
        """Embeddings of positions ``start .. start + n - 1``: ``[n, C]``."""
        pos = torch.arange(start, start + n, device=self.strides.device)
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
    """Pre-activation residual block (section 5.2): x + attn(norm(x)), then x + mlp(norm(x)).

    With ``persistent_memory`` > 0 it is an all-attention layer: no feed-forward sublayer, the persistent
    key/value vectors take its place (``sparse_transformer.all_attention``).
    """

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
        persistent_memory: int = 0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = make_attention(
            attention, d_model, n_heads, layout, block_size, backend, performer, adaptive_span, persistent_memory
        )
        self.norm2 = None if persistent_memory else nn.LayerNorm(d_model)
        self.mlp = None if persistent_memory else MLP(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: BlockKVCache | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h) if cache is None else self.attn(h, cache))  # only sparse attention caches
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def decode(self, x: torch.Tensor, cache: BlockKVCache, pos: int) -> torch.Tensor:
        x = x + self.attn.decode(self.norm1(x), cache, pos)
        return x if self.mlp is None else x + self.mlp(self.norm2(x))


def check_architecture(
    seq_len: int,
    n_layers: int,
    pattern: AttentionPattern,
    backend: str,
    attention: str,
    persistent_memory: int,
    hourglass: HourglassConfig | None,
) -> None:
    """Refuse combinations of the architecture options that make no sense, in one line each."""
    pattern.check(seq_len)
    check_attention(attention, pattern, backend, persistent_memory)
    check_persistent_memory(persistent_memory, pattern.block_size)
    if hourglass is not None:
        hourglass.check()
    if hourglass is not None and hourglass.n_layers != n_layers:
        raise InputError(
            f"n_layers={n_layers} does not match the {hourglass.n_layers} layers of hourglass spec "
            f"{hourglass.spec!r}; set n_layers to {hourglass.n_layers}"
        )


class SparseTransformer(nn.Module):
    """Bytes ``[B, N]`` -> next-byte logits ``[B, N, vocab_size]``.

    Args:
        seq_len: context length N; positions beyond it have no embedding.
        shape: axes of the factorized positional embedding (product must be ``seq_len``); None for 1-D.
        recompute: recompute each block's activations in the backward pass instead of storing them,
            trading about a third more compute for memory that no longer grows with depth.
        persistent_memory: M learned key/value vectors per head in every block's softmax, replacing the
            feed-forward sublayer (all-attention layer); 0 is off. A multiple of the pattern's block_size.
        hourglass: arrange the ``n_layers`` blocks as a hierarchy of shortened levels (Hourglass);
            positions are embedded at full length, and a shortened level's pattern counts its own positions.
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
        persistent_memory: int = 0,
        hourglass: HourglassConfig | None = None,
        attention: AttentionKind = "sparse",
        performer: PerformerConfig = PerformerConfig(),
        adaptive_span: AdaptiveSpanConfig = AdaptiveSpanConfig(),
    ):
        super().__init__()
        shape = tuple(shape) if shape else (seq_len,)
        if math.prod(shape) != seq_len:
            raise ValueError(f"positional shape {list(shape)} does not multiply to seq_len={seq_len}")
        check_architecture(seq_len, n_layers, pattern, backend, attention, persistent_memory, hourglass)
        self.attention = attention
        self.seq_len, self.block_size, self.recompute = seq_len, pattern.block_size, recompute
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = PositionalEmbedding(shape, d_model)
        self.drop = nn.Dropout(dropout)
        d_ff = int(ffn_mult * d_model)

        def block(n: int, layer: int) -> Block:
            layout = pattern.layout(n_heads, n, layer)
            return Block(
                d_model, n_heads, d_ff, dropout, layout, pattern.block_size, backend,
                attention, performer, adaptive_span, persistent_memory,
            )  # fmt: skip

        self.blocks = None if hourglass else nn.ModuleList(block(seq_len, layer) for layer in range(n_layers))
        self.hourglass = Hourglass(hourglass, d_model, n_heads, seq_len, pattern.block_size, block) if hourglass else None
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        # Residual projections start small so the sum over the residual branches (2 per block, 1 without
        # a feed-forward sublayer) keeps unit scale (section 5.2).
        branches = [p for name, p in self.named_parameters() if name.endswith(("attn.proj.weight", "mlp.proj.weight"))]
        for p in branches:
            nn.init.normal_(p, std=0.02 / math.sqrt(len(branches)))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, caches: list[BlockKVCache] | None = None) -> torch.Tensor:
        """Logits for every position; with ``caches`` (from :meth:`new_caches`), also fill them (prefill)."""
        B, N = idx.shape
        if N > self.seq_len:
            raise ValueError(f"sequence of {N} tokens is longer than the model's context seq_len={self.seq_len}")
        # Tiles must be whole: pad on the right, which causal attention never sees from the left. Padded keys
        # in a cache are overwritten by the real tokens before any query can read them.
        pad = -N % self.block_size
        x = self.embed(F.pad(idx, (0, pad))) + self.pos(N + pad)  # (B, N', C)
        x = self.drop(x)
        if self.hourglass is not None:
            x = self.hourglass(x, self._run)
        else:
            for i, block in enumerate(self.blocks):
                x = self._run(block, x, caches[i] if caches else None)
        return self.head(self.norm(x))[:, :N]  # (B, N, vocab)

    def _run(self, block: nn.Module, x: torch.Tensor, cache: BlockKVCache | None = None) -> torch.Tensor:
        if self.recompute and self.training:
            return checkpoint(block, x, use_reentrant=False)
        return block(x, cache)

    @property
    def supports_kv_cache(self) -> bool:
        """Incremental decoding needs one flat stack of block-sparse layers (an Hourglass re-pools the past;
        FAVOR+ and adaptive span have no cache here)."""
        return self.hourglass is None and self.attention == "sparse"

    def new_caches(self) -> list[BlockKVCache]:
        """One empty key/value cache per layer, for :meth:`forward` (prefill) then :meth:`decode`."""
        return [block.attn.new_cache() for block in self.blocks]

    def decode(self, idx: torch.Tensor, pos: int, caches: list[BlockKVCache]) -> torch.Tensor:
        """Next-token logits ``[B, vocab]`` after token ``idx`` ``[B, 1]`` at position ``pos``."""
        if pos >= self.seq_len:
            raise ValueError(f"position {pos} is beyond the model's context seq_len={self.seq_len}")
        x = self.embed(idx) + self.pos(1, start=pos)  # (B, 1, C)
        for block, cache in zip(self.blocks, caches):
            x = block.decode(x, cache, pos)
        return self.head(self.norm(x))[:, -1]  # (B, vocab)

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
