"""Lookup tables of a block layout: which key blocks each query block reads, and the transpose.

Built once per layout and cached (``per_layout``), so every backend's work follows the number of non-zero tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

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


class LayoutCache(Generic[T]):
    """``build(layout, *args)``, cached by the layout's content, so every layer whose layout is the same (a
    128-layer model alternating two rules has two) shares one entry, built once.

    Finding the content costs a copy to the CPU and a hash, done once per layout tensor: its identity (storage,
    view, ``_version``, so an in-place edit misses) maps to its digest. That map holds the tensors weakly, so it
    knows which layouts are alive. An entry stays while a layout with its content is alive, however many there
    are; of the entries no live layout uses, the ``spare`` most recent stay (a layout rebuilt for each call still
    hits) and the rest go. So the cache follows the models in the process, never a fixed count that a deep model
    can outgrow. ``builds`` counts the calls to ``build``; a build that raises caches nothing.
    """

    def __init__(self, build: Callable[..., T], spare: int = 16):
        functools.update_wrapper(self, build)
        self.build, self.spare, self.builds = build, spare, 0
        self.entries: OrderedDict[tuple, T] = OrderedDict()

    def __call__(self, layout: torch.Tensor, *args) -> T:
        key = (layout_digest(layout), *args)
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
            return value
        value = self.build(layout, *args)
        self.builds += 1
        self.entries[key] = value
        if len(self.entries) > self.spare:
            live = _live_digests()
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
_digests: OrderedDict[tuple, tuple[weakref.ref, tuple]] = OrderedDict()  # layout identity -> (its base, weakly; digest)
IDENTITIES = 4096  # identities kept beyond the live ones' (entries are small; dead ones are swept first)


def layout_digest(layout: torch.Tensor) -> tuple:
    """(shape, hash of the values) of a layout, computed once per layout tensor and version."""
    base = layout if layout._base is None else layout._base
    identity = (layout.data_ptr(), tuple(layout.shape), layout.stride(), layout.device, layout._version)
    hit = _digests.get(identity)
    if hit is not None and hit[0]() is base:
        _digests.move_to_end(identity)
        return hit[1]
    values = layout.detach().cpu().contiguous().numpy().tobytes()
    digest = (tuple(layout.shape), layout.dtype, hashlib.blake2b(values, digest_size=16).digest())
    _digests[identity] = (weakref.ref(base), digest)
    if len(_digests) > IDENTITIES:
        for k in [k for k, (ref, _) in _digests.items() if ref() is None]:
            del _digests[k]
        while len(_digests) > IDENTITIES:
            _digests.popitem(last=False)
    return digest


def _live_digests() -> set[tuple]:
    return {digest for ref, digest in _digests.values() if ref() is not None}


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
def layout_tables(layout: torch.Tensor) -> LayoutTables:
    """Tables of a bool ``[H, R, C]`` layout, built once per layout."""
    return LayoutTables(rows=_table(layout), cols=_table(layout.transpose(1, 2)))
