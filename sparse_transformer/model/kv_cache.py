"""Key/value cache for incremental decoding that keeps and reads only the blocks a sparse pattern allows.

Decoding position t reads the key blocks of its query block's layout row. A key block is stored from the
moment its first key is written until the last query block of the context that reads it has passed. What that
keeps depends on the pattern: a fixed layer drops each chunk once it is behind, holding its summary blocks and
the current chunk, O(N / l + l); a strided layer's column rule reads every block again l blocks later, so it
holds almost the whole prefix until the last l blocks of the context (its saving is in reading, not holding).
Blocks are looked up in the layout's rows, never in a grid.

Each query block gathers, once, the blocks every head reads into one tensor, each head its own: with rules
split over the heads a head reads half the blocks of the union, and a token's attention is one batched
product over them, with no mask to build.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparse_transformer.model.layout import BlockLayout


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
        self.blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.peak_bytes = 0  # the most bytes held at once, stored blocks and gathered keys (held_bytes)
        self._row: int | None = None  # query block that the gathered keys below serve
        # Head h's key blocks of the row, left-padded to the longest head's count S, its diagonal last.
        self._keys: torch.Tensor | None = None  # (B * H, S * block_size, D)
        self._values: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None  # (B * H, 1, S * block_size): 0, or -inf on padding

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store keys/values ``[B, H, T, D]`` of positions ``start .. start + T - 1``."""
        bs = self.block_size
        for pos in range(start - start % bs, start + k.shape[2], bs):
            kb, lo = pos // bs, max(start, pos)
            hi = min(pos + bs, start + k.shape[2])
            if kb not in self.blocks:
                shape = (*k.shape[:2], bs, k.shape[-1])
                self.blocks[kb] = (k.new_zeros(shape), v.new_zeros(shape))
            kblock, vblock = self.blocks[kb]
            kblock[:, :, lo - pos : hi - pos] = k[:, :, lo - start : hi - start]
            vblock[:, :, lo - pos : hi - pos] = v[:, :, lo - start : hi - start]

    def attend(self, q: torch.Tensor, pos: int) -> torch.Tensor:
        """Attention of the query ``[B, H, 1, D]`` at position ``pos`` over its allowed keys; ``[B, H, 1, D]``."""
        B, H, _, D = q.shape
        row = pos // self.block_size
        if row != self._row:
            self._enter_row(row, B)
        n = self._keys.shape[1] - self.block_size + pos % self.block_size + 1  # up to pos: the diagonal is last
        scores = torch.baddbmm(self._bias[..., :n], q.reshape(B * H, 1, D), self._keys[:, :n].transpose(1, 2), alpha=D**-0.5)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(self._values.dtype)  # (B * H, 1, n)
        return torch.bmm(probs, self._values[:, :n]).view(B, H, 1, D).to(q.dtype)

    def _enter_row(self, row: int, batch: int) -> None:
        """Switch to query block ``row``: drop blocks no later query reads, gather each head's blocks of the row.

        The row's own (diagonal) block is last for every head and is stored as a view of the gathered keys, so
        the keys written while decoding this row land in both at once.
        """
        if self._row in self.blocks:  # the previous diagonal block: stop sharing the old gathered storage
            self.blocks[self._row] = tuple(t.clone() for t in self.blocks[self._row])
        self.blocks = {kb: kv for kb, kv in self.blocks.items() if self.last_use[kb] >= row}
        H, bs = self.layout.n_heads, self.block_size
        per_head = [self.layout.row(h, row).long() for h in range(H)]
        columns = torch.unique(torch.cat(per_head))  # union over heads, ascending: the diagonal last
        S = max(len(mine) for mine in per_head)
        # slot s of head h -> its block's place in columns; a head with fewer blocks is padded with its diagonal
        slots = torch.stack(
            [F.pad(torch.searchsorted(columns, mine), (S - len(mine), 0), value=len(columns) - 1) for mine in per_head]
        )
        padding = torch.stack([torch.arange(S) < S - len(mine) for mine in per_head])  # (H, S)
        kblock = self.blocks[row][0]
        heads, slots = torch.arange(H, device=kblock.device)[:, None], slots.to(kblock.device)
        gathered = []
        for t in (0, 1):  # keys, values: (B, H, U, bs, D) -> each head's slots (B, H, S, bs, D)
            stored = torch.stack([self.blocks[c][t] for c in columns.tolist()], dim=2)
            gathered.append(stored[:, heads, slots])
        keys, values = gathered
        self.blocks[row] = (keys[:, :, -1], values[:, :, -1])
        D = kblock.shape[-1]
        self._keys, self._values = keys.view(batch * H, S * bs, D), values.view(batch * H, S * bs, D)
        bias = torch.zeros(H, 1, S * bs, dtype=kblock.dtype, device=kblock.device)
        bias.masked_fill_(padding.repeat_interleave(bs, dim=1).unsqueeze(1).to(kblock.device), -math.inf)
        self._bias = bias.repeat(batch, 1, 1)  # (B * H, 1, S * bs)
        self._row = row
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())

    def held_bytes(self) -> int:
        """Bytes of keys and values held now: the stored blocks and the row's gathered copy of them."""
        shared = self._row if self._keys is not None else None  # the diagonal block lives in the gathered keys
        stored = sum(k.nbytes + v.nbytes for kb, (k, v) in self.blocks.items() if kb != shared)
        return stored + (0 if self._keys is None else self._keys.nbytes + self._values.nbytes)

    def stored_blocks(self) -> int:
        return len(self.blocks)
