"""Block-sparse attention on the CPU as dense pieces that PyTorch's fused flash-attention kernel runs.

PyTorch's CPU flash kernel is fast for many queries against one set of keys; called with a single block of
queries its backward falls to about half speed, and with a general mask through SDPA it is 5-10x slower.
So the layout is split into pieces that give it many queries per key set:

- Windows. A query block's key blocks that run side by side up to and including its own (the local window
  of ``local`` and ``strided``, a block's own chunk in ``fixed``) form a window that slides with the row.
  ``SUPERROW`` consecutive rows share the union of their windows: one piece of that many queries, on strided
  views of q, k and v (no copy), with a small mask, the same for every superrow of the same shape, for the
  keys a row must not see (after its own position, or before its window). Superrows of the same shape in
  arithmetic progression are one call.
- Chains. A block's other key blocks (``strided``'s columns, ``fixed``'s summaries) are often shared: rows of
  one chunk read the same summaries, and a ``strided`` row reads its predecessor's columns and one more.
  Rows whose sets nest form a chain; ``CHAIN`` rows of a chain (and any more with the same set) read the
  first one's set together (gathered once for all of them, no mask), and each reads the few blocks it has
  beyond that on its own.

The pieces of a row are merged by their log-sum-exp, exactly, as flash attention merges its key tiles. The
backward is flash attention's too: each piece's gradients come from the fused backward kernel given the
merged output and log-sum-exp, which is exact for any split of the keys. Only q, k, v, the output and the
log-sum-exp are kept for it; gathered key blocks are gathered again in the backward, and the key gradients of
overlapping windows, separate buffers, are made a few superrows at a time. Both come in chunks small enough
(``CHUNK_BYTES``) that the allocator reuses their memory instead of faulting in fresh pages, and memory stays
linear in N (``bench/memory.py``). A dense layout is one causal call.

It calls the flash kernel's ATen ops (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward),
the only CPU entry points that take a mask and return the log-sum-exp; ``tests/test_kernel_pieces.py`` holds
every piece to the oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparse_transformer.model.kernels.checks import check_inputs
from sparse_transformer.model.kernels.lut import per_layout
from sparse_transformer.model.layout import BlockLayout

SUPERROW = 2  # rows per window piece: more queries per key for the kernel, little of the union wasted
MIN_RUN = 4  # a superrow's rows each see at least this many blocks before their own, or go one by one
CHAIN = 4  # rows of a chain that read one key set together
CHUNK_BYTES = 8 << 20  # gathered keys or window key gradients per call; under glibc's 32 MiB mmap threshold, so memory is reused

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class Window:
    """Superrows of ``rows`` blocks starting at rows ``r0, r0 + step, ...`` (``count`` of them) in heads ``h0, h0 +
    hstep, ...`` (``heads`` of them), each reading key blocks ``r + offset .. r + offset + width - 1`` under
    ``visible``, a ``[rows, width]`` block mask in which a row's own block is causal."""

    h0: int
    hstep: int
    heads: int
    r0: int
    step: int
    count: int
    rows: int
    offset: int
    width: int
    visible: tuple[tuple[bool, ...], ...]


@dataclass(frozen=True)
class Gather:
    """Pieces of ``rows`` query blocks each (flat ``h * R + r`` indices, ``queries [P, rows]``) that read ``width``
    key blocks (``keys [P, width]``, ascending) under ``visible``, a ``[rows, width]`` block mask the same for
    every piece; a row marked ``own`` reads its own block too, its last visible one, causally."""

    queries: torch.Tensor
    keys: torch.Tensor
    rows: int
    width: int
    visible: tuple[tuple[bool, ...], ...]
    own: tuple[bool, ...]


@dataclass(frozen=True)
class Plan:
    windows: tuple[Window, ...]
    gathers: tuple[Gather, ...]
    masks: dict = field(default_factory=dict, compare=False)  # (visible, block size, dtype, causal) -> mask

    def mask(
        self, visible: tuple[tuple[bool, ...], ...], block_size: int, dtype: torch.dtype, causal: tuple[bool, ...] | None = None
    ) -> torch.Tensor:
        """``_mask``, made once per plan: its masks live as long as the plan's cache entry (``lut.per_layout``)."""
        key = (visible, block_size, dtype, causal)
        if key not in self.masks:
            self.masks[key] = _mask(visible, block_size, dtype, causal)
        return self.masks[key]


def pieces_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of q, k, v ``[B, H, N, D]`` over the tiles of ``layout`` (H heads of N / bs blocks), on the CPU."""
    layout = check_inputs(q, k, v, layout, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if layout.is_dense:  # every causal tile: one causal call over the whole sequence
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    plan = _plan(layout, q.shape[0] * block_size * q.shape[-1] * q.element_size())
    return _Pieces.apply(q, k, v, plan, block_size, scale)


@per_layout
def _plan(layout: BlockLayout, block_bytes: int) -> Plan:
    """The pieces of a layout, built once per layout (and the bytes of a block of a batch's keys)."""
    H, R = layout.n_heads, layout.n_blocks
    windows: dict[tuple, list[tuple[int, int]]] = {}  # superrow shape -> [(head, first row)]
    gathers: dict[tuple, list[tuple[list[int], list[int]]]] = {}  # (rows, width, visible, own) -> [(queries, keys)]
    for h in range(H):
        starts, rests = [], []
        ptr = (layout.indptr[h * R : (h + 1) * R + 1] - layout.indptr[h * R]).tolist()
        head = layout.indices[layout.indptr[h * R] : layout.indptr[(h + 1) * R]].tolist()  # one head's entries at a time
        for r in range(R):
            cols = head[ptr[r] : ptr[r + 1] - 1]  # the row's key blocks before its diagonal, ascending
            run = 0  # the key blocks right before the diagonal, side by side
            while run < len(cols) and cols[-1 - run] == r - 1 - run:
                run += 1
            starts.append(r - run)
            rests.append(cols[: len(cols) - run])
        bare = {r for r in range(R) if starts[r] == r}  # rows whose window would be their own block alone
        folded = set()
        for queries, keys, visible, own in _chains(rests, bare):
            folded |= {r for r, o in zip(queries, own) if o}
            shape = (len(queries), len(keys), visible, own)
            gathers.setdefault(shape, []).append(([h * R + r for r in queries], [h * R + c for c in keys]))
        for rows in _superrows(starts, skip=folded):
            lo = min(starts[r] for r in rows)
            visible = tuple(tuple(starts[r] <= c <= r for c in range(lo, rows[-1] + 1)) for r in rows)
            windows.setdefault((len(rows), lo - rows[0], visible), []).append((h, rows[0]))
    return Plan(
        windows=tuple(w for shape, firsts in windows.items() for w in _windows(shape, firsts)),
        gathers=tuple(g for shape, pieces in gathers.items() for g in _batches(shape, pieces, block_bytes)),
    )


def _superrows(starts: list[int], skip: set[int]) -> list[range]:
    """Rows in groups of ``SUPERROW`` consecutive ones; a group with a short window goes row by row, since its
    union would be mostly what its rows must not see. Rows in ``skip`` have no window: a chain read their block."""
    out = []
    for r0 in range(0, len(starts), SUPERROW):
        rows = range(r0, min(r0 + SUPERROW, len(starts)))
        if all(r - starts[r] >= MIN_RUN for r in rows):
            out.append(rows)
        else:
            out += [range(r, r + 1) for r in rows if r not in skip]
    return out


def _chains(rests: list[list[int]], bare: set[int]) -> list[tuple[list[int], list[int], tuple, tuple[bool, ...]]]:
    """Pieces ``(query blocks, key blocks, visible, own)`` that read the key sets ``rests[r]``.

    Rows are chained where one's set contains the last one's, shortest first. ``CHAIN`` rows of a chain, and any
    more with the same set (the rows of a ``fixed`` chunk), read the union of their sets in one piece, each
    under a mask that hides what its set lacks. A row in ``bare`` (no window) whose own block is in that union
    (a ``strided`` column row: the next row down its column reads it) reads its own block there too.
    """
    order = sorted((r for r, rest in enumerate(rests) if rest), key=lambda r: len(rests[r]))
    chains: list[list[int]] = []
    for r in order:
        mine = set(rests[r])
        fits = [c for c in chains if set(rests[c[-1]]) <= mine]
        if fits:
            max(fits, key=lambda c: len(rests[c[-1]])).append(r)
        else:
            chains.append([r])
    pieces = []
    for chain in chains:
        a = 0
        while a < len(chain):
            b = a + 1
            while b < len(chain) and (b - a < CHAIN or rests[chain[b]] == rests[chain[a]]):
                b += 1
            rows, a = chain[a:b], b
            keys = sorted(set().union(*(rests[r] for r in rows)))
            own = tuple(r in bare and r in keys for r in rows)
            visible = tuple(tuple(c in rests[r] or (o and c == r) for c in keys) for r, o in zip(rows, own))
            pieces.append((rows, keys, visible, own))
    return pieces


def _windows(shape: tuple, firsts: list[tuple[int, int]]) -> list[Window]:
    """Superrows of one shape as rectangles of head and row progressions."""
    rows, offset, visible = shape
    by_head: dict[int, list[int]] = {}
    for h, r0 in firsts:
        by_head.setdefault(h, []).append(r0)
    runs: dict[tuple[int, int, int], list[int]] = {}  # (r0, step, count) -> heads
    for h, r0s in by_head.items():
        for run in _progressions(sorted(r0s)):
            runs.setdefault(run, []).append(h)
    return [
        Window(h0, hstep, heads, r0, step, count, rows, offset, len(visible[0]), visible)
        for (r0, step, count), hs in runs.items()
        for h0, hstep, heads in _progressions(hs)
    ]


def _progressions(values: list[int]) -> list[tuple[int, int, int]]:
    """Sorted ints as maximal arithmetic progressions ``(first, step, count)``, greedily."""
    out, i = [], 0
    while i < len(values):
        step = values[i + 1] - values[i] if i + 1 < len(values) else 1
        n = 1
        while i + n < len(values) and values[i + n] - values[i + n - 1] == step:
            n += 1
        out.append((values[i], step, n))
        i += n
    return out


def _batches(shape: tuple, pieces: list[tuple[list[int], list[int]]], block_bytes: int) -> list[Gather]:
    rows, width, visible, own = shape
    queries = torch.tensor([q for q, _ in pieces])  # (P, rows)
    keys = torch.tensor([k for _, k in pieces])  # (P, width)
    per_call = max(1, CHUNK_BYTES // (width * block_bytes))
    return [Gather(qs, ks, rows, width, visible, own) for qs, ks in zip(queries.split(per_call), keys.split(per_call))]


class _Pieces(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, block_size: int, scale: float):
        B, H, N, D = q.shape
        R, bs = N // block_size, block_size
        qb, kb, vb = (t.reshape(B, H * R, bs, D).contiguous() for t in (q, k, v))  # (B, H*R, bs, D)
        out = torch.zeros(B, H * R, bs, D, dtype=torch.float32)  # merged in fp32
        lse = torch.full((B, H * R, bs), float("-inf"), dtype=torch.float32)  # not the default dtype (bf16-true sets it)
        views = _Views(B, H, R, bs)
        for w in plan.windows:
            mask = plan.mask(w.visible, bs, q.dtype)
            for b in views.batches(w):
                part, part_lse = _flash(
                    views.rows(qb, w, b), views.keys(kb, w, b), views.keys(vb, w, b), 0.0, False, attn_mask=mask, scale=scale
                )[:2]
                _merge_into(views.rows(out, w, b), views.rows(lse, w, b), part, part_lse)
        for g in plan.gathers:
            P, rows = len(g.queries), g.queries.flatten()
            keys = g.keys.flatten()
            part, part_lse = _flash(
                qb.index_select(1, rows).view(B, P, g.rows * bs, D),
                kb.index_select(1, keys).view(B, P, g.width * bs, D),
                vb.index_select(1, keys).view(B, P, g.width * bs, D),
                0.0,
                False,
                attn_mask=_gather_mask(plan, g, bs, q.dtype),
                scale=scale,
            )[:2]
            o, lo = out.index_select(1, rows), lse.index_select(1, rows)
            _merge_into(o.view(B, P, g.rows * bs, D), lo.view(B, P, g.rows * bs), part, part_lse)
            out.index_copy_(1, rows, o)
            lse.index_copy_(1, rows, lo)
        out = out.to(q.dtype)
        ctx.save_for_backward(qb, kb, vb, out, lse)
        ctx.plan, ctx.scale, ctx.shape = plan, scale, q.shape
        return out.view(B, H, N, D)

    @staticmethod
    def backward(ctx, grad):
        qb, kb, vb, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, H, N, D = ctx.shape
        R, bs = qb.shape[1] // H, qb.shape[2]
        gb = grad.reshape(B, H * R, bs, D).contiguous()
        dq, dk, dv = (torch.zeros_like(qb) for _ in range(3))
        views = _Views(B, H, R, bs)
        for w in plan.windows:
            mask = plan.mask(w.visible, bs, qb.dtype)
            for b in views.batches(w):
                g_, q_, o_, lse_, dq_ = (views.rows(t, w, b) for t in (gb, qb, out, lse, dq))
                k_, v_ = views.keys(kb, w, b), views.keys(vb, w, b)
                dk_, dv_ = ([views.block(t, w, b, w.offset + j) for j in range(w.width)] for t in (dk, dv))
                # the key gradients of overlapping windows are separate buffers, width blocks per superrow: made
                # CHUNK_BYTES at a time, so memory stays linear in N and the allocator reuses it
                per_call = max(1, CHUNK_BYTES // (q_.shape[0] * w.width * qb[0, 0].nbytes))
                for c in range(0, w.count, per_call):
                    s = slice(c, c + per_call)
                    gq, gk, gv = _flash_backward(
                        g_[:, s], q_[:, s], k_[:, s], v_[:, s], o_[:, s], lse_[:, s], 0.0, False, attn_mask=mask, scale=scale
                    )
                    dq_[:, s].add_(gq)
                    for j in range(w.width):  # key block r + offset + j of every superrow: one strided view each
                        block = slice(j * bs, (j + 1) * bs)
                        dk_[j][:, s].add_(gk[:, :, block])
                        dv_[j][:, s].add_(gv[:, :, block])
        for g in plan.gathers:
            P, rows, keys = len(g.queries), g.queries.flatten(), g.keys.flatten()
            gq, gk, gv = _flash_backward(
                gb.index_select(1, rows).view(B, P, g.rows * bs, D),
                qb.index_select(1, rows).view(B, P, g.rows * bs, D),
                kb.index_select(1, keys).view(B, P, g.width * bs, D),
                vb.index_select(1, keys).view(B, P, g.width * bs, D),
                out.index_select(1, rows).view(B, P, g.rows * bs, D),
                lse.index_select(1, rows).view(B, P, g.rows * bs),
                0.0,
                False,
                attn_mask=_gather_mask(plan, g, bs, qb.dtype),
                scale=scale,
            )
            dq.index_add_(1, rows, gq.reshape(B, P * g.rows, bs, D))
            dk.index_add_(1, keys, gk.reshape(B, P * g.width, bs, D))
            dv.index_add_(1, keys, gv.reshape(B, P * g.width, bs, D))
        shape = ctx.shape
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None


@dataclass(frozen=True)
class _Views:
    """Strided views of contiguous ``(B, H*R, bs, ...)`` tensors for a window's superrows and keys."""

    B: int
    H: int
    R: int
    bs: int

    def batches(self, w: Window) -> list[int | None]:
        """None: one call for every batch element (heads that tile all H merge with the batch); else one each."""
        return [None] if self.B == 1 or w.heads * w.hstep == self.H else list(range(self.B))

    def rows(self, t: torch.Tensor, w: Window, b: int | None) -> torch.Tensor:
        """``(B' * heads, count, rows * bs[, D])``: each superrow's query blocks."""
        return self._view(t, w, b, 0, w.rows)

    def keys(self, t: torch.Tensor, w: Window, b: int | None) -> torch.Tensor:
        """``(B' * heads, count, width * bs, D)``: each superrow's key blocks, overlapping views."""
        return self._view(t, w, b, w.offset, w.width)

    def block(self, t: torch.Tensor, w: Window, b: int | None, shift: int) -> torch.Tensor:
        """``(B' * heads, count, bs, D)``: block ``r0 + shift`` of each superrow."""
        return self._view(t, w, b, shift, 1)

    def _view(self, t: torch.Tensor, w: Window, b: int | None, shift: int, blocks: int) -> torch.Tensor:
        inner = t.shape[3:]  # (D,) for q, k, v, out; () for the log-sum-exp
        per_block = self.bs * math.prod(inner)
        heads = w.heads * (1 if b is not None else self.B)
        size = (heads, w.count, blocks * self.bs, *inner)
        stride = (w.hstep * self.R * per_block, w.step * per_block, *t.stride()[2:])
        first = (0 if b is None else b * self.H * self.R) + w.h0 * self.R + w.r0 + shift
        return t.as_strided(size, stride, t.storage_offset() + first * per_block)


def _gather_mask(plan: Plan, g: Gather, block_size: int, dtype: torch.dtype) -> torch.Tensor | None:
    """None where every row of a gathered piece sees every key (no mask is fastest), else its mask."""
    if not any(g.own) and all(all(row) for row in g.visible):
        return None
    return plan.mask(g.visible, block_size, dtype, g.own)


def _mask(
    visible: tuple[tuple[bool, ...], ...], block_size: int, dtype: torch.dtype, causal: tuple[bool, ...] | None = None
) -> torch.Tensor:
    """The additive mask of a piece's shape, ``(rows * bs, width * bs)``: 0 where a query sees a key, -inf where
    not: outside the row's blocks, and after the query within its own block, its last visible one (every row of
    a window; the rows marked ``causal`` of a gathered piece)."""
    blocks = torch.tensor(visible)  # (rows, width)
    rows, width = blocks.shape
    own = torch.zeros_like(blocks)
    own[torch.arange(rows), blocks.int().cumsum(1).argmax(1)] = True
    if causal is not None:
        own &= torch.tensor(causal)[:, None]
    position = torch.arange(block_size)
    future = (position[None, :] > position[:, None]).repeat(rows, width)  # (rows*bs, width*bs)
    def spread(m: torch.Tensor) -> torch.Tensor:
        return m.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)

    allowed = spread(blocks) & ~(spread(own) & future)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def _merge_into(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> None:
    """``out``, ``lse`` (fp32; views into the running result) become attention over their keys and the part's."""
    merged = torch.logaddexp(lse, part_lse)
    out.mul_(torch.exp(lse - merged).unsqueeze(-1)).add_(part.float() * torch.exp(part_lse - merged).unsqueeze(-1))
    lse.copy_(merged)
