"""Key/value cache for incremental decoding that keeps and reads only the blocks a sparse pattern allows.

Decoding position t reads the key blocks of its query block's layout row. A key block is stored from the
moment its first key is written until the last query block of the context that reads it has passed. What that
keeps depends on the pattern: a fixed layer drops each chunk once it is behind, holding its summary blocks and
the current chunk, O(N / l + l); a strided layer's column rule reads every block again l blocks later, so it
holds almost the whole prefix until the last l blocks of the context (its saving is in reading, not holding).
Blocks are looked up in the layout's rows, never in a grid.

Blocks live in the slots of one pool per cache (a paged cache), which doubles when full, up to the context; a
dropped block frees its slot for the next. Each query block gathers, once, the blocks every head reads into one
buffer that is reused from row to row, each head its own: with rules split over the heads a head reads half the
blocks of the union, and a token's attention is one batched product over them, with no mask to build. Nothing
is allocated per block or per row, so memory is the pool and the buffer: allocating a few MB for every row
while small blocks stayed behind fragmented the C heap, 5 GB held for a 400 MB cache at N = 65,536.
"""

from __future__ import annotations

import math

import torch

from sparse_transformer.model.layout import BlockLayout

FIRST_SLOTS = 16  # the pool's first size in blocks; it doubles from there


class BlockKVCache:
    """The cache of one attention layer: key/value blocks of ``[B, H, block_size, D]`` by block index."""

    def __init__(self, layout: BlockLayout, block_size: int):
        self.layout, self.block_size = layout, block_size  # over the whole context
        R = layout.n_blocks
        # Last query block that reads each key block, over every head; causal layouts always read their diagonal.
        if layout.is_dense:
            self.last_use = [R - 1] * R
        else:
            last = torch.full((R,), -1, dtype=torch.int64)
            self.last_use = last.scatter_reduce_(0, layout.indices.long(), layout.row_ids() % R, "amax").tolist()
        self._longest = R if layout.is_dense else int(layout.counts().max())  # blocks of the longest row of a head
        self.blocks: dict[int, int] = {}  # key block -> its slot in the pool
        self.peak_bytes = 0  # the most bytes held at once: the pool and the gather buffer (held_bytes)
        self._pool: list[torch.Tensor] = []  # keys, values: (B, P, H, bs, D), block b in slot blocks[b]
        self._free: list[int] = []  # slots no block holds
        self._row: int | None = None  # query block that the gathered keys below serve
        self._buffer: list[torch.Tensor] = []  # keys, values: flat, room for the longest row of every head
        # Head h's key blocks of the row, left-padded to the longest head's count S, its diagonal last. The diagonal
        # is written here while the row is decoded, and into its slot when the next row is entered.
        self._gathered: list[torch.Tensor] = []  # keys, values: (B, H, S, bs, D), views of the buffers
        self._bias: torch.Tensor | None = None  # (B * H, 1, S * block_size): 0, or -inf on padding

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store keys/values ``[B, H, T, D]`` of positions ``start .. start + T - 1``."""
        bs = self.block_size
        for pos in range(start - start % bs, start + k.shape[2], bs):
            kb, lo = pos // bs, max(start, pos)
            hi = min(pos + bs, start + k.shape[2])
            if kb not in self.blocks:
                self.blocks[kb] = self._new_slot(k, v)
            for t, new in enumerate((k, v)):
                block = self._gathered[t][:, :, -1] if kb == self._row else self._pool[t][:, self.blocks[kb]]
                block[:, :, lo - pos : hi - pos] = new[:, :, lo - start : hi - start]

    def attend(self, q: torch.Tensor, pos: int) -> torch.Tensor:
        """Attention of the query ``[B, H, 1, D]`` at position ``pos`` over its allowed keys; ``[B, H, 1, D]``."""
        B, H, _, D = q.shape
        row = pos // self.block_size
        if row != self._row:
            self._enter_row(row)
        keys, values = (g.view(B * H, -1, D) for g in self._gathered)  # (B * H, S * bs, D)
        n = keys.shape[1] - self.block_size + pos % self.block_size + 1  # up to pos: the diagonal is last
        scores = torch.baddbmm(self._bias[..., :n], q.reshape(B * H, 1, D), keys[:, :n].transpose(1, 2), alpha=D**-0.5)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)  # (B * H, 1, n)
        return torch.bmm(probs, values[:, :n]).view(B, H, 1, D).to(q.dtype)

    def _new_slot(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """A free slot of the pool, zeroed (made, or doubled, on demand: batch, heads and dtype come with the keys)."""
        if not self._free:
            B, H, _, D = k.shape
            used = self._pool[0].shape[1] if self._pool else 0
            size = min(max(2 * used, FIRST_SLOTS), self.layout.n_blocks)  # never more blocks than the context
            grown = [x.new_empty(B, size, H, self.block_size, D) for x in (k, v)]
            for old, new in zip(self._pool, grown):
                new[:, :used] = old
            self._pool, self._free = grown, list(range(size - 1, used - 1, -1))
        slot = self._free.pop()
        for pool in self._pool:
            pool[:, slot] = 0
        return slot

    def _enter_row(self, row: int) -> None:
        """Switch to query block ``row``: drop blocks no later query reads, gather each head's blocks of the row."""
        if self._row is not None:  # the previous diagonal block, written in the gather buffer: into its slot
            for pool, gathered in zip(self._pool, self._gathered):
                pool[:, self.blocks[self._row]] = gathered[:, :, -1]
        for kb in [kb for kb in self.blocks if self.last_use[kb] < row]:
            self._free.append(self.blocks.pop(kb))
        H, bs = self.layout.n_heads, self.block_size
        per_head = [self.layout.row(h, row).long() for h in range(H)]
        S = max(len(mine) for mine in per_head)
        # Slot s of head h holds the pool slot of its block; a head with fewer blocks than S is padded in front with
        # its diagonal, which the bias masks. Row slot * H + h of the pool seen as (B, P * H, bs * D) is that block.
        padded = [[self.blocks[row]] * (S - len(mine)) + [self.blocks[c] for c in mine.tolist()] for mine in per_head]
        padding = torch.stack([torch.arange(S) < S - len(mine) for mine in per_head])  # (H, S)
        B, P, _, _, D = self._pool[0].shape
        flat = (torch.tensor(padded) * H + torch.arange(H)[:, None]).flatten().to(self._pool[0].device)  # (H * S,)
        self._gathered = []
        for t, pool in enumerate(self._pool):
            if len(self._buffer) <= t:
                self._buffer.append(pool.new_empty(B * H * self._longest * bs * D))
            out = self._buffer[t][: B * H * S * bs * D].view(B, H * S, bs * D)
            torch.index_select(pool.view(B, P * H, bs * D), 1, flat, out=out)
            self._gathered.append(out.view(B, H, S, bs, D))
        bias = torch.zeros(H, 1, S * bs, dtype=pool.dtype, device=pool.device)
        bias.masked_fill_(padding.repeat_interleave(bs, dim=1).unsqueeze(1).to(pool.device), -math.inf)
        self._bias = bias.repeat(B, 1, 1)  # (B * H, 1, S * bs)
        self._row = row
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())

    def held_bytes(self) -> int:
        """Bytes of keys and values held now: the pool (used slots and free ones) and the gather buffer."""
        return sum(t.nbytes for t in self._pool + self._buffer)

    def stored_blocks(self) -> int:
        return len(self.blocks)
