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
tiles are masked element-wise to stay causal. ``layout`` gives the tiles as a :class:`BlockLayout` (the key
blocks each query block reads, built in O(tiles) at any length), ``mask`` the exact element sets of the
definitions above as a dense grid for tests; with ``block_size=1`` the two coincide.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Literal

import torch

from sparse_transformer.errors import InputError
from sparse_transformer.model.layout import BlockLayout

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

    def layout(self, n_heads: int, seq_len: int, layer: int = 0) -> BlockLayout:
        """The tiles each head computes at ``seq_len``, built from the rules in O(tiles). Layers whose layouts are
        equal share one object while it is alive (every layer but for interleaved's two), as do the caches the
        backends build from it."""
        self.check(seq_len)
        if self.needs_stride and self.stride is None:
            raise PatternError(f"pattern kind {self.kind!r} needs a stride; set pattern.stride")
        which = layer % 2 if self.heads == "interleaved" and self.n_rules == 2 else 0
        key = (self, n_heads, seq_len, which)
        layout = _layouts.get(key)
        if layout is None:
            layout = _layouts[key] = self._heads(n_heads, seq_len // self.block_size, self.block_size, layer)
        return layout

    def mask(self, n_heads: int, seq_len: int, layer: int = 0) -> torch.Tensor:
        """Bool ``[n_heads, seq_len, seq_len]``: the exact element sets of the paper's definitions. O(N^2): for
        tests and figures at small N."""
        if seq_len < 1:
            raise PatternError(f"sequence length {seq_len} must be positive")
        if self.needs_stride and self.stride is None:
            raise PatternError(f"pattern kind {self.kind!r} needs a stride; set pattern.stride")
        return self._heads(n_heads, seq_len, 1, layer).to_dense()

    def _heads(self, n_heads: int, n: int, unit: int, layer: int) -> BlockLayout:
        if self.kind == "dense":
            return BlockLayout.causal(n_heads, n)
        rules = [self._rule(r, n, unit) for r in range(self.n_rules)]  # one head's (counts, columns) each
        if len(rules) > 1 and self.heads == "merged":
            rules = [_union(rules, n)]
        rules = [(count, columns.to(torch.int32)) for count, columns in rules]  # the layout's dtype, once per rule
        if len(rules) == 1:
            per_head = rules * n_heads
        elif self.heads == "interleaved":
            per_head = [rules[layer % 2]] * n_heads
        else:
            per_head = [rules[h % 2] for h in range(n_heads)]
        count = torch.cat([c for c, _ in per_head])
        return BlockLayout(n_heads, n, torch.cat([torch.zeros(1, dtype=torch.int64), count.cumsum(0)]), torch.cat([i for _, i in per_head]))

    def density(self, n_heads: int, seq_len: int) -> float:
        """About the fraction of the causal tiles the layouts at ``seq_len`` compute (over layers, for interleaved),
        counted from the rules' row lengths in O(N / block_size), before any layout is built: what a config is
        checked by. For merged heads, whose rules may share tiles, a bound from above."""
        self.check(seq_len)
        if self.kind == "dense":
            return 1.0
        n = seq_len // self.block_size
        rules = [sum(int(_count(torch.arange(n), start, step).sum()) for start, step in self._runs(r, n, self.block_size))
                 for r in range(self.n_rules)]  # fmt: skip
        tiles = sum(rules) if self.heads == "merged" else sum(rules) / len(rules)
        return min(1.0, tiles / (n * (n + 1) / 2))

    def _rule(self, r: int, n: int, unit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rule ``r`` on ``n`` cells ``unit`` positions wide, as one head's rows: ``(count (n,), columns)``."""
        runs = [_progression(torch.arange(n), start, step) for start, step in self._runs(r, n, unit)]
        return runs[0] if len(runs) == 1 else _union(runs, n)

    def _runs(self, r: int, n: int, unit: int) -> list[tuple[torch.Tensor, int]]:
        """Rule ``r``'s cells in each row i of ``n`` cells ``unit`` positions wide: arithmetic progressions of
        columns ``(start[i], step)`` up to i, made directly, so the cost is the number of cells.

        With l and c multiples of ``unit`` they are exactly "the cell holds a pair (i, j) of the rule"; ``unit=1``
        gives the element-level definition.
        """
        i = torch.arange(n)
        l = self.stride // unit
        if self.kind == "local" or (self.kind == "strided" and r == 0):  # j in [i - l, i]
            return [((i - l).clamp(min=0), 1)]
        if self.kind == "strided":  # j = i, i - l, i - 2l, ...
            return [(i % l, l)]
        if r == 0:  # fixed A(1): the chunk of i, up to i
            return [(i // l * l, 1)]
        # fixed A(2): the cells that reach a summary position, i.e. (j mod l + 1) * unit > l * unit - c, which is
        # j mod l >= l - ceil(c / unit), one progression each; and itself.
        return [*((torch.full_like(i, o), l) for o in range(l - -(-self.summary // unit), l)), (i, 1)]


def _count(last: torch.Tensor, start: torch.Tensor, step: int) -> torch.Tensor:
    """Columns ``start, start + step, ...`` up to ``last``, row by row."""
    return ((last + 1 - start + step - 1) // step).clamp(min=0)


def _progression(last: torch.Tensor, start: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose columns run ``start[i], start[i] + step, ...`` up to ``last[i]``: ``(count, columns)``."""
    count = _count(last, start, step)
    within = torch.arange(int(count.sum())) - torch.repeat_interleave(count.cumsum(0) - count, count)
    return count, torch.repeat_interleave(start, count) + within * step


def _union(rules: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of several rules over ``n`` cells merged, each column once, ascending: ``(count, columns)``."""
    rows = torch.cat([torch.arange(n).repeat_interleave(count) for count, _ in rules])
    keys = torch.unique(rows * n + torch.cat([cols for _, cols in rules]))  # sorted by row, then column
    return torch.bincount(keys // n, minlength=n), keys % n


_layouts: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (pattern, heads, N, rule) -> its live layout


def sqrt_stride(seq_len: int, block_size: int) -> int:
    """The stride l ~ sqrt(N) of section 4.2, in whole blocks: what a pattern uses when the data says nothing else."""
    return max(block_size, round(math.sqrt(seq_len) / block_size) * block_size)


# Checkpoints carry the pattern; let torch.load(weights_only=True) rebuild it.
torch.serialization.add_safe_globals([AttentionPattern])
