"""The Sparse Transformer (Child et al. 2019): a decoder-only Transformer over bytes with sparse attention.

Every part is built from one :class:`~sparse_transformer.model.config.ModelConfig`, passed whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparse_transformer.model.attention import Attention
from sparse_transformer.model.config import ModelConfig
from sparse_transformer.model.hourglass import Hourglass
from sparse_transformer.model.kv_cache import BlockKVCache


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
        self.register_buffer("sizes", torch.tensor(self.shape), persistent=False)

    def forward(self, n: int, start: int = 0) -> torch.Tensor:
        """Embeddings of positions ``start .. start + n - 1``: ``[n, C]``.

        A training step asks for every position: 1-D is a slice of the table and several axes one broadcast
        sum, with no gather to run forward or scatter backward. Decoding asks for a few: those are gathered.
        """
        if len(self.tables) == 1:
            # A copy, not a view: a view of a parameter taken under no_grad claims requires_grad with no grad_fn,
            # which module hooks (FlopCounterMode's module tracker) refuse.
            return self.tables[0][start : start + n].clone()  # (n, C)
        if start == 0 and n == math.prod(self.shape):
            axes = len(self.shape)
            grid = sum(t.view(*(t.shape[0] if a == i else 1 for a in range(axes)), -1) for i, t in enumerate(self.tables))
            return grid.reshape(n, -1)  # (rows, cols, ..., C) -> (n, C)
        pos = torch.arange(start, start + n, device=self.strides.device)
        coords = (pos.unsqueeze(1) // self.strides) % self.sizes  # (n, axes)
        return sum(table[coords[:, a]] for a, table in enumerate(self.tables))  # (n, C)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.proj = nn.Linear(config.d_ff, config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-activation residual block (section 5.2): x + attn(norm(x)), then x + mlp(norm(x)).

    With an attention that replaces it (persistent memory) it is an all-attention layer: no feed-forward
    sublayer, the persistent key/value vectors take its place (``attention/persistent_memory.py``).
    """

    def __init__(self, config: ModelConfig, seq_len: int, layer: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn: Attention = config.attention.build(config, seq_len, layer)
        feed_forward = not config.attention.replaces_feed_forward
        self.norm2 = nn.LayerNorm(config.d_model) if feed_forward else None
        self.mlp = MLP(config) if feed_forward else None
        self.drop = nn.Dropout(config.dropout)
        self.recompute = config.recompute

    def forward(self, x: torch.Tensor, cache: BlockKVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache))
        return x if self.mlp is None else x + self._feed_forward(x)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """norm2 and the MLP. Under ``recompute`` on a long sequence, ``CHUNK`` tokens at a time, each chunk's
        activations recomputed in the backward pass: the recomputed block then holds its 4x-wide hidden layer for
        one chunk, not the sequence (3 GiB at N = 2^20, d = 192), for one more forward of the MLP."""
        B, N, C = x.shape
        if not (self.recompute and torch.is_grad_enabled() and B * N > CHUNK):
            return self._norm_mlp(x)
        chunks = x.split(max(1, CHUNK // B), dim=1)
        return torch.cat([checkpoint(self._norm_mlp, chunk, use_reentrant=False) for chunk in chunks], dim=1)

    def _norm_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def decode(self, x: torch.Tensor, cache: BlockKVCache, pos: int) -> torch.Tensor:
        x = x + self.attn.decode(self.norm1(x), cache, pos)
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def flops(self, n: int) -> float:
        """Forward FLOPs on a sequence of ``n`` positions."""
        mlp = 0 if self.mlp is None else 2.0 * (self.mlp.fc.weight.numel() + self.mlp.proj.weight.numel())
        return n * (self.attn.flops_per_token(n) + mlp)


# Tokens per chunk where a long sequence is processed a piece at a time (the loss; the MLP under recompute).
CHUNK = 16384


class SparseTransformer(nn.Module):
    """Bytes ``[B, N]`` -> next-byte logits ``[B, N, vocab_size]``; :meth:`loss` without the whole logits.

    ``config`` comes resolved against the data (``Modality.resolve``: the LightningModule does it); what it
    still leaves out gets the generic defaults (``ModelConfig.resolve``), and the result is ``self.config``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config = config.resolve()
        self.seq_len, self.block_size = config.seq_len, config.pattern.block_size
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = PositionalEmbedding(config.positions, config.d_model)
        self.drop = nn.Dropout(config.dropout)

        def block(seq_len: int, layer: int) -> Block:
            return Block(config, seq_len, layer)

        flat = config.hourglass is None
        self.blocks = nn.ModuleList(block(config.seq_len, i) for i in range(config.n_layers)) if flat else None
        self.hourglass = None if flat else Hourglass(config, config.seq_len, block)
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Compiled views of the blocks, sharing their parameters; a plain dict, so the state dict keeps its keys.
        self._compiled: dict[int, nn.Module] = {}
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

    def forward(
        self, idx: torch.Tensor, caches: list[BlockKVCache] | None = None, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits for every position; with ``caches`` (from :meth:`new_caches`), also fill them (prefill).

        Given ``targets`` ``[B, N]``, instead their mean cross-entropy, ``CHUNK`` tokens at a time: the whole
        ``[B, N, vocab]`` logits never exist (1 GiB at N = 2^20, and as much again for their gradient). In training
        each chunk's logits are recomputed in the backward pass, one small matmul. (The loss is computed here, in
        ``forward``, so that wrappers that hook a module's call, FSDP2's unsharding among them, see it.)"""
        if targets is None:
            return self.head(self.norm(self.hidden(idx, caches)))  # (B, N, vocab)
        h, y = self.hidden(idx).flatten(0, 1), targets.flatten()  # (B*N, C), (B*N,)
        checkpoint_chunk = lambda hc, yc: checkpoint(self._chunk_loss, hc, yc, use_reentrant=False)  # noqa: E731
        if len(y) <= CHUNK:
            return self._chunk_loss(h, y) / len(y)
        loss = checkpoint_chunk if torch.is_grad_enabled() else self._chunk_loss
        chunks = zip(h.split(CHUNK), y.split(CHUNK))  # split, not slices: its backward joins the chunks' gradients once
        return sum(loss(hc, yc) for hc, yc in chunks) / len(y)

    def _chunk_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.norm(h)).float(), y, reduction="sum")

    def hidden(self, idx: torch.Tensor, caches: list[BlockKVCache] | None = None) -> torch.Tensor:
        """The last block's output ``[B, N, C]``, before the final norm and the head."""
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
        return x[:, :N]  # (B, N, C)

    def _run(self, block: Block, x: torch.Tensor, cache: BlockKVCache | None = None) -> torch.Tensor:
        if self.config.compile and cache is None:
            block = self._compiled.setdefault(id(block), torch.compile(block))
        if self.config.recompute and self.training:
            return checkpoint(block, x, use_reentrant=False)
        return block(x, cache)

    def all_blocks(self) -> Iterator[Block]:
        """Every block, from the input to the output (through the levels of an Hourglass)."""
        return iter(self.blocks) if self.hourglass is None else self.hourglass.blocks()

    @property
    def supports_kv_cache(self) -> bool:
        """Incremental decoding needs one flat stack (an Hourglass re-pools the past) of kinds that decode."""
        return self.hourglass is None and all(block.attn.can_decode for block in self.blocks)

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

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Sum of the attention kinds' loss terms (adaptive-span penalties), or None when no kind has one."""
        terms = [t for block in self.all_blocks() if (t := block.attn.auxiliary_loss()) is not None]
        return torch.stack(terms).sum() if terms else None

    def metrics(self) -> dict[str, float]:
        """What the attention kinds log, each under its module's path (``span/blocks.0.attn/head1``)."""
        names = {id(m): name for name, m in self.named_modules()}
        return {k: v for block in self.all_blocks() for k, v in block.attn.metrics(names[id(block.attn)]).items()}

    def before_step(self, step: int) -> None:
        """Per-step upkeep before training step ``step`` (FAVOR+ redraws, spans clamped back into range)."""
        for block in self.all_blocks():
            block.attn.before_step(step)

    def flops_per_token(self, n: int | None = None) -> float:
        """Forward FLOPs per token of a sequence of ``n`` (default: the context), counting the work every part
        does: linear layers at 2 FLOPs per multiply-add, each attention kind its own, Hourglass levels at
        their own lengths. Training is 3x this (forward, backward)."""
        n = self.seq_len if n is None else n
        padded = math.ceil(n / self.block_size) * self.block_size
        body = self.hourglass.flops(padded) if self.hourglass is not None else sum(b.flops(padded) for b in self.blocks)
        return body / n + 2.0 * self.head.weight.numel()
