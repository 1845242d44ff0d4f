"""Key/value cache for incremental decoding that keeps and reads only the blocks a sparse pattern allows.

Decoding position t reads the key blocks of its query block's layout row. A key block is stored from the
moment its first key is written until the last query block of the context that reads it has passed, so a
strided layer holds its local window and its column blocks, not the whole prefix: O(sqrt(N)) blocks for the
paper's patterns, read from the layout's rows, never from a grid.
"""

from __future__ import annotations

import math

import torch

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
        self._row: int | None = None  # query block that the gathered keys below serve
        self._keys: torch.Tensor | None = None  # (B, H, U * block_size, D) the row's blocks, diagonal last
        self._values: torch.Tensor | None = None
        self._allowed: torch.Tensor | None = None  # (H, U * block_size) layout of the gathered keys
        self._key_pos: torch.Tensor | None = None  # (U * block_size,) their positions

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
        row = pos // self.block_size
        if row != self._row:
            self._enter_row(row, q.device)
        visible = self._allowed & (self._key_pos <= pos)  # keys after pos are not written yet
        scores = (q @ self._keys.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])  # (B, H, 1, U * bs)
        scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
        return (torch.softmax(scores, dim=-1).to(self._values.dtype) @ self._values).to(q.dtype)

    def _enter_row(self, row: int, device: torch.device) -> None:
        """Switch to query block ``row``: drop blocks no later query reads, gather this row's columns once.

        The row's own (diagonal) block is last in the gathered keys and is stored as a view of them, so
        the keys written while decoding this row land in both at once.
        """
        if self._row in self.blocks:  # the previous diagonal block: stop sharing the old gathered storage
            self.blocks[self._row] = tuple(t.clone() for t in self.blocks[self._row])
        self.blocks = {kb: kv for kb, kv in self.blocks.items() if self.last_use[kb] >= row}
        per_head = [self.layout.row(h, row).long() for h in range(self.layout.n_heads)]
        columns = torch.unique(torch.cat(per_head))  # union over heads, ascending: the diagonal last
        allowed = torch.stack([torch.isin(columns, mine) for mine in per_head])  # (H, U)
        cols = columns.tolist()
        self._allowed = allowed.repeat_interleave(self.block_size, dim=1).to(device)  # (H, U * bs)
        offsets = torch.arange(self.block_size)
        self._key_pos = torch.cat([c * self.block_size + offsets for c in cols]).to(device)
        self._keys = torch.cat([self.blocks[c][0] for c in cols], dim=2)  # (B, H, U * bs, D)
        self._values = torch.cat([self.blocks[c][1] for c in cols], dim=2)
        self.blocks[row] = (self._keys[:, :, -self.block_size :], self._values[:, :, -self.block_size :])
        self._row = row

    def stored_blocks(self) -> int:
        return len(self.blocks)
