"""Factorized attention patterns of Child et al. (2019), section 4, as causal block layouts.

A pattern is a set of rules, each the set of keys j a query i may attend to (always j <= i):

- ``dense``:   every earlier position.
- ``local``:   the window {i - l, ..., i}.
- ``strided``: A(1) = {i - l, ..., i} and A(2) = {j : (i - j) mod l = 0}. With l the row width of an
  image this is "attend to the row, then to the column".
- ``fixed``:   A(1) = {j : floor(j / l) = floor(i / l)} and A(2) = {j : j mod l in {l - c, ..., l - 1}}.

Every rule also contains j = i (only fixed A(2) lacks it in the paper), so no query is left with
nothing to attend to when a layer or head uses that rule alone.

Two-rule patterns combine across layers and heads as in the paper (section 4.3):

- ``interleaved``: layer k uses rule k mod 2 in every head;
- ``merged``:      every head attends to the union of the rules;
- ``split``:       head h uses rule h mod 2.

Attention is computed at the granularity of ``block_size`` x ``block_size`` tiles, as in the paper's
block-sparse kernels: a tile is attended when its rule reaches any of its positions, and the diagonal
tiles are masked element-wise to stay causal. ``layout`` gives the tiles, ``mask`` the exact element
sets of the definitions above; with ``block_size=1`` the two coincide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from sparse_transformer.errors import InputError

PatternKind = Literal["dense", "local", "strided", "fixed"]
HeadMode = Literal["interleaved", "merged", "split"]


class PatternError(InputError, ValueError):
    """Pattern parameters that cannot describe the requested sequence."""


@dataclass(frozen=True)
class AttentionPattern:
    """Which keys each query may attend to.

    Args:
        kind: ``dense``, ``local``, ``strided`` or ``fixed``.
        block_size: tile size of the layout; the sequence length and ``stride`` must be multiples of it.
        stride: l in the paper: window length (local, strided A(1)), stride (strided A(2)) or
            chunk length (fixed). Ignored for dense. None derives it from the data when the model is
            built: one image row for images, about sqrt(N) in whole blocks otherwise (section 4.2).
        summary: c in the paper: the last c positions of each chunk that every later query sees (fixed).
        heads: how a two-rule pattern is spread over layers and heads: interleaved, merged or split.
    """

    kind: PatternKind = "dense"
    block_size: int = 32
    stride: int | None = None
    summary: int = 32
    heads: HeadMode = "merged"

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "local", "strided", "fixed"):
            raise PatternError(f"pattern kind {self.kind!r} is not one of dense, local, strided, fixed")
        if self.heads not in ("interleaved", "merged", "split"):
            raise PatternError(f"pattern heads {self.heads!r} is not one of interleaved, merged, split")
        if self.block_size < 1:
            raise PatternError(f"pattern block_size={self.block_size} must be >= 1")
        if self.kind == "dense" or self.stride is None:
            return
        if self.stride < 1 or self.stride % self.block_size:
            raise PatternError(
                f"pattern stride={self.stride} must be a positive multiple of block_size={self.block_size}"
            )
        if self.kind == "fixed" and not 1 <= self.summary <= self.stride:
            raise PatternError(f"pattern summary={self.summary} must be in 1..stride={self.stride}")

    def check(self, seq_len: int) -> None:
        """Refuse a sequence length the layout cannot tile."""
        if seq_len < 1 or seq_len % self.block_size:
            raise PatternError(
                f"sequence length {seq_len} is not a positive multiple of block_size={self.block_size}"
            )

    @property
    def needs_stride(self) -> bool:
        return self.kind != "dense"

    @property
    def n_rules(self) -> int:
        return 2 if self.kind in ("strided", "fixed") else 1

    def layout(self, n_heads: int, seq_len: int, layer: int = 0) -> torch.Tensor:
        """Bool ``[n_heads, seq_len // block_size, seq_len // block_size]``: the tiles each head computes."""
        self.check(seq_len)
        return self._heads(n_heads, seq_len // self.block_size, self.block_size, layer)

    def mask(self, n_heads: int, seq_len: int, layer: int = 0) -> torch.Tensor:
        """Bool ``[n_heads, seq_len, seq_len]``: the exact element sets of the paper's definitions."""
        if seq_len < 1:
            raise PatternError(f"sequence length {seq_len} must be positive")
        return self._heads(n_heads, seq_len, 1, layer)

    def _heads(self, n_heads: int, n: int, unit: int, layer: int) -> torch.Tensor:
        if self.needs_stride and self.stride is None:
            raise PatternError(f"pattern kind {self.kind!r} needs a stride; set pattern.stride")
        rules = [self._rule(r, n, unit) for r in range(self.n_rules)]
        if len(rules) == 1 or self.heads == "merged":
            per_head = [torch.stack(rules).any(0)] * n_heads
        elif self.heads == "interleaved":
            per_head = [rules[layer % 2]] * n_heads
        else:
            per_head = [rules[h % 2] for h in range(n_heads)]
        return torch.stack(per_head)

    def _rule(self, r: int, n: int, unit: int) -> torch.Tensor:
        """Rule ``r`` on an ``n x n`` grid whose cells are ``unit`` positions wide.

        With l and c multiples of ``unit`` the closed forms below are exactly "the cell holds a pair
        (i, j) of the rule"; ``unit=1`` gives the element-level definition.
        """
        i = torch.arange(n).unsqueeze(1)
        j = torch.arange(n).unsqueeze(0)
        causal = j <= i
        if self.kind == "dense":
            return causal
        l = self.stride // unit
        if self.kind == "local" or (self.kind == "strided" and r == 0):
            return causal & (i - j <= l)
        if self.kind == "strided":
            return causal & ((i - j) % l == 0)
        if r == 0:  # fixed A(1): same chunk
            return causal & (i // l == j // l)
        # fixed A(2): the cell reaches a summary position, i.e. (j mod l + 1) * unit > l - c; and itself.
        return causal & ((j % l + 1) * unit > self.stride - self.summary) | (i == j)


def check_layout_size(n_heads: int, n_layers: int, seq_len: int, block_size: int) -> None:
    """Refuse, before building them, layouts this machine has no memory for: each layer keeps a bool ``[H, R, R]``
    layout (R = seq_len / block_size), and building one takes int64 grids of R x R (about 24 bytes a tile)."""
    r = seq_len // block_size
    needed = r * r * (n_heads * n_layers + 24 + n_heads)
    available = _available_memory()
    if available is not None and needed > available:
        raise PatternError(
            f"the attention layouts of seq_len={seq_len} in blocks of {block_size} ({r:,} x {r:,} tiles a head, "
            f"{n_layers} layers) need about {needed / 2**30:,.1f} GiB to build, more than the {available / 2**30:,.1f} GiB "
            "of memory available; use a larger pattern block_size or a shorter seq_len"
        )


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def sqrt_stride(seq_len: int, block_size: int) -> int:
    """The stride l ~ sqrt(N) of section 4.2, in whole blocks: what a pattern uses when the data says nothing else."""
    return max(block_size, round(math.sqrt(seq_len) / block_size) * block_size)


def density(layout: torch.Tensor) -> float:
    """Fraction of the causal tiles a layout computes (1.0 for dense)."""
    nb = layout.shape[-1]
    return layout.sum().item() / (layout.shape[0] * nb * (nb + 1) / 2)


def element_mask(layout: torch.Tensor, block_size: int) -> torch.Tensor:
    """Bool ``[H, N, N]``: what block-sparse attention computes, i.e. the tiles of ``layout`` made causal."""
    mask = layout.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    n = mask.shape[-1]
    return mask & torch.ones(n, n, dtype=torch.bool, device=layout.device).tril()


# Checkpoints carry the pattern; let torch.load(weights_only=True) rebuild it.
torch.serialization.add_safe_globals([AttentionPattern])
