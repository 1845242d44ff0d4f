"""What the backends build from a layout, built once per layout and cached (``per_layout``): the padded lookup
tables of the Triton kernel and ``blocks`` (which key blocks each query block reads, and the transpose).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from sparse_transformer.model.layout import BlockLayout

T = TypeVar("T")


@dataclass(frozen=True)
class BlockTable:
    """Non-zero tiles of a ``[H, R, C]`` layout, row by row.

    ``index[h, r, :count[h, r]]`` are the columns of row r in ascending order; the rest is padding (0).
    """

    index: torch.Tensor  # (H, R, max_count) int32
    count: torch.Tensor  # (H, R) int32

    @property
    def width(self) -> int:
        return self.index.shape[-1]


@dataclass(frozen=True)
class LayoutTables:
    rows: BlockTable  # key blocks of each query block (forward, dQ)
    cols: BlockTable  # query blocks of each key block (dK, dV)


def _table(n_rows: int, indptr: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> BlockTable:
    """The rows of a compressed-sparse-rows table padded to the widest: O(rows x width)."""
    count = indptr.diff()  # (rows,)
    width = max(int(count.max()), 1)
    index = torch.zeros(n_rows, width, dtype=torch.int32)
    row = torch.arange(n_rows).repeat_interleave(count)
    index[row, torch.arange(len(indices)) - indptr[:-1].repeat_interleave(count)] = indices.int()
    return BlockTable(index=index.view(*shape, width), count=count.int().view(shape).contiguous())


class LayoutCache(Generic[T]):
    """``build(layout, *args)``, cached by the layout's content (``BlockLayout.digest``, a hash made once per
    layout object), so every layer whose layout is the same (a 128-layer model alternating two rules has two)
    shares one entry, built once.

    The layouts asked about are held weakly, so the cache knows which are alive. An entry stays while a layout
    with its content is alive, however many there are; of the entries no live layout uses, the ``spare`` most
    recent stay (a layout rebuilt for each call still hits) and the rest go. So the cache follows the models in
    the process, never a fixed count that a deep model
    can outgrow. ``builds`` counts the calls to ``build``; a build that raises caches nothing.
    """

    def __init__(self, build: Callable[..., T], spare: int = 16):
        functools.update_wrapper(self, build)
        self.build, self.spare, self.builds = build, spare, 0
        self.entries: OrderedDict[tuple, T] = OrderedDict()

    def __call__(self, layout: BlockLayout, *args) -> T:
        key = (layout.digest, *args)
        _live.add(layout)
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
            return value
        value = self.build(layout, *args)
        self.builds += 1
        self.entries[key] = value
        if len(self.entries) > self.spare:
            live = {layout.digest for layout in _live}
            dead = [k for k in self.entries if k[0] not in live]  # oldest first
            for k in dead[: len(self.entries) - self.spare]:
                del self.entries[k]
        return value

    def cache_clear(self) -> None:
        self.entries.clear()


def per_layout(build: Callable[..., T]) -> LayoutCache[T]:
    """Decorate ``build(layout, *args)`` to be built once per layout content (and ``args``): ``LayoutCache``."""
    cache = LayoutCache(build)
    _caches.append(cache)
    return cache


_caches: list[LayoutCache] = []
_live: weakref.WeakSet[BlockLayout] = weakref.WeakSet()  # every layout a cache was asked about, while it is alive


def clear_caches() -> None:
    """Empty every per-layout cache (``bench/memory.py`` measures a layout's first call)."""
    for cache in _caches:
        cache.cache_clear()


def cache_bytes() -> int:
    """Bytes of the tensors held by every per-layout cache (plans, tables, masks): what they add to memory."""
    seen: set[int] = set()

    def size(x: object) -> int:
        if id(x) in seen:
            return 0
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            return x.untyped_storage().nbytes()
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(size(v) for v in x)
        if dataclasses.is_dataclass(x):
            return sum(size(getattr(x, f.name)) for f in dataclasses.fields(x))
        return 0

    return sum(size(value) for cache in _caches for value in cache.entries.values())


@per_layout
def layout_tables(layout: BlockLayout, device: torch.device) -> LayoutTables:
    """Tables of a layout on ``device``, built once per layout. The columns are the rows of the transpose: its
    entries ordered by column, then row (a stable sort of the row-ordered entries)."""
    H, R = layout.n_heads, layout.n_blocks
    rows = _table(H * R, layout.indptr, layout.indices, (H, R))
    row = layout.row_ids()
    column = row // R * R + layout.indices.long()  # flat h * R + c
    order = torch.sort(column, stable=True).indices
    count = torch.bincount(column, minlength=H * R)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), count.cumsum(0)])
    cols = _table(H * R, indptr, (row % R)[order], (H, R))
    return LayoutTables(*(BlockTable(t.index.to(device), t.count.to(device)) for t in (rows, cols)))
