"""Lookup tables of a block layout: which key blocks each query block reads, and the transpose.

Built once per layout and cached, so every backend's work follows the number of non-zero tiles.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


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


_CACHE: OrderedDict[tuple, tuple[torch.Tensor, LayoutTables]] = OrderedDict()
_CACHE_SIZE = 64


def layout_tables(layout: torch.Tensor) -> LayoutTables:
    """Tables of a bool ``[H, R, C]`` layout, cached by the identity of its storage.

    The cache holds a reference to the layout, so its memory cannot be reused by another tensor while
    the entry lives; an in-place edit bumps ``_version`` and misses the cache.
    """
    key = (layout.data_ptr(), layout.shape, layout.stride(), layout.device, layout._version)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit[1]
    tables = LayoutTables(rows=_table(layout), cols=_table(layout.transpose(1, 2)))
    _CACHE[key] = (layout, tables)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return tables
