"""A causal block layout as compressed sparse rows: for each head and query block, the key blocks it reads.

What every backend, the key/value cache and the density figure take. Built from a pattern's rules in O(nnz)
(``patterns.py``), never as a grid: at N = 2^20 in blocks of 64 a grid has 2^28 tiles a head, while the paper's
patterns read about 2 sqrt(R) blocks a row, a few MB a head. ``to_dense`` exists for the tests' oracle and for
hand-made layouts at small N; ``from_dense`` takes such a grid back.
"""

from __future__ import annotations

import functools
import hashlib

import torch


class LayoutError(ValueError):
    """A layout that is not causal, lacks a diagonal tile or does not fit the sequence."""


class BlockLayout:
    """The tiles of a causal layout with ``n_heads`` heads of ``n_blocks`` query and key blocks.

    Row ``i = h * n_blocks + r`` (head h, query block r) reads key blocks ``indices[indptr[i]:indptr[i + 1]]``,
    strictly ascending, its own block (the diagonal, masked element-wise by the kernels) last. ``causal(H, R)``
    is every causal tile (dense attention): it stores no rows until asked for them, so a dense layout at any
    length costs nothing and the backends see ``is_dense`` and call dense causal attention instead.

    Immutable once made and checked at construction (O(nnz)); equal contents give equal ``digest``, which the
    backends' caches key on (``kernels/lut.py``).
    """

    def __init__(self, n_heads: int, n_blocks: int, indptr: torch.Tensor | None = None, indices: torch.Tensor | None = None):
        self.n_heads, self.n_blocks = int(n_heads), int(n_blocks)
        if self.n_heads < 1 or self.n_blocks < 1:
            raise LayoutError(f"a layout needs at least one head and one block, got {n_heads} heads of {n_blocks} blocks")
        if (indptr is None) != (indices is None):
            raise LayoutError("a layout's indptr and indices come together (both None: every causal tile)")
        self._indptr, self._indices = indptr, indices
        self._crops: dict[int, BlockLayout] = {}
        if indptr is not None:
            self._indptr = indptr.to("cpu", torch.int64).contiguous()
            self._indices = indices.to("cpu", torch.int32).contiguous()
            self._check()

    @classmethod
    def causal(cls, n_heads: int, n_blocks: int) -> BlockLayout:
        """Every causal tile: dense causal attention."""
        return cls(n_heads, n_blocks)

    @classmethod
    def from_rows(cls, n_heads: int, n_blocks: int, rows: torch.Tensor, cols: torch.Tensor) -> BlockLayout:
        """The tiles ``(rows[t], cols[t])``, rows flat (``h * n_blocks + r``), in any order, repeats allowed."""
        keys = torch.unique(rows.long() * n_blocks + cols.long())  # sorted: by row, then column
        rows = keys // n_blocks
        count = torch.bincount(rows, minlength=n_heads * n_blocks)
        return cls(n_heads, n_blocks, _pointers(count), keys % n_blocks)

    @classmethod
    def from_dense(cls, layout: torch.Tensor) -> BlockLayout:
        """The layout of a bool ``[H, R, R]`` grid (hand-made layouts, tests); refused in one line unless causal
        with every diagonal tile set."""
        if layout.dtype != torch.bool:
            raise LayoutError(f"layout dtype {layout.dtype} is not supported; use torch.bool")
        if layout.dim() != 3 or layout.shape[1] != layout.shape[2]:
            raise LayoutError(f"layout shape {list(layout.shape)} is not [H, R, R]")
        layout = layout.cpu()
        above = layout.triu(1).nonzero()
        if len(above):
            h, r, c = above[0].tolist()
            raise LayoutError(f"layout is not causal: head {h} has tile ({r}, {c}) above the diagonal")
        H, R, _ = layout.shape
        flat = layout.reshape(H * R, R)
        return cls(H, R, _pointers(flat.sum(1)), flat.nonzero()[:, 1])

    # What the kernels read.

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(H, R, R)``, as the grid it stands for."""
        return self.n_heads, self.n_blocks, self.n_blocks

    @property
    def is_dense(self) -> bool:
        """Every causal tile set: one causal call over the whole sequence is the whole work."""
        return self.nnz == self.n_heads * self.n_blocks * (self.n_blocks + 1) // 2

    @property
    def nnz(self) -> int:
        """Tiles computed, over every head."""
        if self._indices is None:
            return self.n_heads * self.n_blocks * (self.n_blocks + 1) // 2
        return len(self._indices)

    @property
    def indptr(self) -> torch.Tensor:
        """``(H * R + 1,)`` int64: where each row's key blocks start in ``indices``."""
        if self._indptr is None:
            self._materialize()
        return self._indptr

    @property
    def indices(self) -> torch.Tensor:
        """``(nnz,)`` int32: the key blocks of every row, row after row."""
        if self._indices is None:
            self._materialize()
        return self._indices

    def counts(self) -> torch.Tensor:
        """``(H, R)`` int64: key blocks each row reads."""
        return self.indptr.diff().view(self.n_heads, self.n_blocks)

    def row_ids(self) -> torch.Tensor:
        """``(nnz,)`` int64: the flat row (``h * R + r``) of each entry of ``indices``."""
        return torch.arange(self.n_heads * self.n_blocks).repeat_interleave(self.indptr.diff())

    def row(self, head: int, r: int) -> torch.Tensor:
        """The key blocks query block ``r`` of ``head`` reads, ascending."""
        i = head * self.n_blocks + r
        if self._indices is None:
            return torch.arange(r + 1, dtype=torch.int32)
        return self._indices[self._indptr[i] : self._indptr[i + 1]]

    def density(self) -> float:
        """Fraction of the causal tiles this layout computes (1.0 for dense)."""
        return self.nnz / (self.n_heads * self.n_blocks * (self.n_blocks + 1) / 2)

    def crop(self, n_blocks: int) -> BlockLayout:
        """The top-left ``n_blocks`` corner: the layout of a shorter sequence (patterns depend only on absolute
        positions). Causal, so a row's columns never pass it. Kept, so one length gives one object."""
        if not 1 <= n_blocks <= self.n_blocks:
            raise LayoutError(f"a crop of {n_blocks} blocks is outside this layout's 1..{self.n_blocks}")
        if n_blocks == self.n_blocks:
            return self
        if n_blocks not in self._crops:
            if self._indices is None:
                self._crops[n_blocks] = BlockLayout.causal(self.n_heads, n_blocks)
            else:
                rows = self._indptr[:-1].view(self.n_heads, self.n_blocks)[:, :n_blocks]  # (H, n)
                count = self.counts()[:, :n_blocks]
                take = (rows.flatten().repeat_interleave(count.flatten()) + _ranks(count.flatten()))
                self._crops[n_blocks] = BlockLayout(self.n_heads, n_blocks, _pointers(count.flatten()), self._indices[take])
        return self._crops[n_blocks]

    def grid(self, rows: range, cols: range) -> torch.Tensor:
        """Bool ``(H, len(rows), len(cols))``: which of the tiles in a window of rows and columns are set. Costs
        the window and the entries of its rows, so a band along the diagonal stays O(N)."""
        H, R = self.n_heads, self.n_blocks
        out = torch.zeros(H, len(rows), len(cols), dtype=torch.bool)
        if not len(rows) or not len(cols):
            return out
        if self._indices is None:
            r = torch.tensor(rows)[:, None]
            c = torch.tensor(cols)[None, :]
            return (c <= r).expand(H, -1, -1).clone()
        count = self.counts()[:, rows.start : rows.stop].flatten()  # (H * n,) entries of each row in the window
        starts = self._indptr[:-1].view(H, R)[:, rows.start : rows.stop].flatten()
        take = starts.repeat_interleave(count) + _ranks(count)
        window = torch.arange(H * len(rows)).repeat_interleave(count)
        head, row = window // len(rows), window % len(rows)
        col = self._indices[take].long() - cols.start
        keep = (col >= 0) & (col < len(cols))
        out[head[keep], row[keep], col[keep]] = True
        return out

    def to_dense(self) -> torch.Tensor:
        """Bool ``[H, R, R]``: the grid, O(R^2); for tests and small N only."""
        H, R = self.n_heads, self.n_blocks
        if self._indices is None:
            return torch.ones(R, R, dtype=torch.bool).tril().expand(H, R, R).clone()
        out = torch.zeros(H * R, R, dtype=torch.bool)
        out[self.row_ids(), self._indices.long()] = True
        return out.view(H, R, R)

    @functools.cached_property
    def digest(self) -> tuple:
        """What identifies the content: equal layouts, equal digests (the backends' caches key on it)."""
        if self._indices is None:
            return ("causal", self.n_heads, self.n_blocks)
        h = hashlib.blake2b(digest_size=16)
        h.update(self._indptr.numpy().tobytes())
        h.update(self._indices.numpy().tobytes())
        return (self.n_heads, self.n_blocks, h.digest())

    def __repr__(self) -> str:
        kind = "dense" if self.is_dense else f"density {self.density():.3f}"
        return f"BlockLayout({self.n_heads} heads, {self.n_blocks} blocks, {self.nnz:,} tiles, {kind})"

    def _materialize(self) -> None:
        """Rows of a dense layout, made when something asks for them (small N; the backends call dense attention)."""
        H, R = self.n_heads, self.n_blocks
        count = torch.arange(1, R + 1).repeat(H)
        self._indptr = _pointers(count)
        self._indices = _ranks(count).int()

    def _check(self) -> None:
        """Causal, strictly ascending rows ending on their diagonal: what every backend assumes. O(nnz)."""
        H, R = self.n_heads, self.n_blocks
        ptr, idx = self._indptr, self._indices
        if ptr.shape != (H * R + 1,) or ptr[0] != 0 or ptr[-1] != len(idx) or (ptr.diff() < 0).any():
            raise LayoutError(f"layout indptr of shape {list(ptr.shape)} is not the row pointers of {H} x {R} rows into {len(idx)} entries")
        count = ptr.diff()
        empty = (count == 0).nonzero()
        if len(empty):
            h, r = divmod(int(empty[0]), R)
            raise LayoutError(f"layout head {h} query block {r} lacks its diagonal tile; every query attends to itself")
        last = idx[ptr[1:] - 1].long()
        diagonal = torch.arange(H * R) % R
        wrong = (last != diagonal).nonzero()
        if len(wrong):
            h, r = divmod(int(wrong[0]), R)
            c = int(last[wrong[0]])
            if c > r:
                raise LayoutError(f"layout is not causal: head {h} has tile ({r}, {c}) above the diagonal")
            raise LayoutError(f"layout head {h} query block {r} lacks its diagonal tile; every query attends to itself")
        steps = idx[1:] - idx[:-1]  # int32, as the entries: an int64 copy was 8 bytes a tile, 3 times over
        starts = torch.zeros(len(idx), dtype=torch.bool)
        starts[ptr[:-1]] = True  # an entry that begins a row may be anything below the last of the previous row
        bad = ((steps <= 0) & ~starts[1:]).nonzero()
        if len(bad) or (idx < 0).any():
            raise LayoutError("layout rows must list key blocks once each, ascending, from block 0")


def _pointers(count: torch.Tensor) -> torch.Tensor:
    """Row pointers ``(len(count) + 1,)`` int64 of rows with ``count`` entries each."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), count.long().cumsum(0)])


def _ranks(count: torch.Tensor) -> torch.Tensor:
    """0, 1, ..., count[i] - 1 for each i, concatenated: an entry's place within its row."""
    count = count.long()
    total = int(count.sum())
    starts = torch.repeat_interleave(count.cumsum(0) - count, count)
    return torch.arange(total) - starts


def element_mask(layout: BlockLayout | torch.Tensor, block_size: int) -> torch.Tensor:
    """Bool ``[H, N, N]``: what block-sparse attention computes, the tiles made causal. The oracle's; O(N^2)."""
    mask = as_layout(layout).to_dense().repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    n = mask.shape[-1]
    return mask & torch.ones(n, n, dtype=torch.bool).tril()


def as_layout(layout: BlockLayout | torch.Tensor) -> BlockLayout:
    """A backend's layout argument as a :class:`BlockLayout`; a bool ``[H, R, R]`` grid (a hand-made layout at
    small N) is taken and converted on each call."""
    if isinstance(layout, BlockLayout):
        return layout
    if isinstance(layout, torch.Tensor):
        return BlockLayout.from_dense(layout)
    raise LayoutError(f"layout must be a BlockLayout or a bool [H, R, R] tensor, got {type(layout).__name__}")
