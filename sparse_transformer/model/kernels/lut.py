"""Lookup tables of a block layout: which key blocks each query block reads, and the transpose.

Built once per layout and cached, so every backend's work follows the number of non-zero tiles.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar
from collections.abc import Callable

import torch

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


def _table(layout: torch.Tensor) -> BlockTable:
    count = layout.sum(-1, dtype=torch.int32)  # (H, R)
    width = max(int(count.max()), 1)
    # A stable sort on "is zero" moves the non-zero columns to the front, in ascending order.
    order = torch.sort((~layout).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    slot = torch.arange(width, device=layout.device)
    index = torch.where(slot < count.unsqueeze(-1), order, 0).to(torch.int32).contiguous()
    return BlockTable(index=index, count=count.contiguous())


def per_layout(build: Callable[..., T], size: int = 64) -> Callable[..., T]:
    """Cache ``build(layout, *args)`` by the identity of the layout's storage (and ``args``).

    Each entry holds a reference to its layout, so the memory cannot be reused by another tensor while
    the entry lives; an in-place edit bumps ``_version`` and misses. A build that raises caches nothing.
    """
    cache: OrderedDict[tuple, tuple[torch.Tensor, T]] = OrderedDict()

    @functools.wraps(build)
    def cached(layout: torch.Tensor, *args) -> T:
        key = (layout.data_ptr(), layout.shape, layout.stride(), layout.device, layout._version, *args)
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit[1]
        value = build(layout, *args)
        cache[key] = (layout, value)
        if len(cache) > size:
            cache.popitem(last=False)
        return value

    return cached


@per_layout
def layout_tables(layout: torch.Tensor) -> LayoutTables:
    """Tables of a bool ``[H, R, C]`` layout, built once per layout."""
    return LayoutTables(rows=_table(layout), cols=_table(layout.transpose(1, 2)))
