"""PyTorch FlexAttention over the same causal block layouts, as a point of comparison for the Triton kernel.

A layout becomes a ``BlockMask``: tiles entirely below the diagonal and entirely in the layout are "full"
(no mask evaluated), tiles that touch the layout otherwise are "partial" and ``mask_mod`` decides each
element: in the layout, and j <= i. On CUDA ``flex_attention`` is compiled into a fused Triton kernel; on
CPU it runs eagerly, materialising the N x N scores, and has no backward in torch 2.11, so there it is
only a forward-pass check against the reference.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention

from sparse_transformer.model.kernels.checks import check_inputs
from sparse_transformer.model.kernels.lut import per_layout
from sparse_transformer.model.layout import BlockLayout


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once, on the first CUDA call (CPU never pays for importing Inductor); Dynamo
    then recompiles only for new shapes."""
    return torch.compile(_flex_attention)


# The kernels' own tiles must divide the BlockMask tile. Compiled by torch 2.11 for 16-bit inputs and head dims
# 64 to 128 on an H100, the backward tiles are 128 wide, so a layout of smaller blocks gets 128-wide tiles.
KERNEL_TILE = 128


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of q, k, v ``[B, H, N, D]`` over the tiles of ``layout`` (H heads of N / bs blocks).

    ``scale`` defaults to 1/sqrt(D). The BlockMask is cached per layout.
    """
    layout = check_inputs(q, k, v, layout, block_size)
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise NotImplementedError(
            "the flex backend has no backward on CPU (torch's FlexAttention is forward-only there); "
            "use the 'blocks' backend to train on CPU"
        )
    block_mask = flex_block_mask(layout, block_size, q.device)
    if q.device.type == "cuda":
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():
        # Eager on CPU is deliberate (a correctness check); silence the advice to compile.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        # Detached: torch refuses CPU inputs that require grad even under no_grad.
        return _flex_attention(q.detach(), k.detach(), v.detach(), block_mask=block_mask, scale=scale)


def flex_tile(block_size: int, seq_len: int) -> int:
    """The BlockMask tile for a layout of ``block_size`` blocks: the block itself, or KERNEL_TILE when the
    blocks are smaller and tile it evenly. Coarser tiles cost compute: one is computed if any block in it is."""
    if block_size < KERNEL_TILE and KERNEL_TILE % block_size == 0 and seq_len % KERNEL_TILE == 0:
        return KERNEL_TILE
    return block_size


@per_layout
def flex_block_mask(layout: BlockLayout, block_size: int, device: torch.device) -> BlockMask:
    """The BlockMask of a layout on ``device``, built once per layout. On the CPU its tiles are the layout's blocks
    (the CPU kernel takes any); on CUDA, ``flex_tile``."""
    N = layout.n_blocks * block_size
    tile = flex_tile(block_size, N) if torch.device(device).type == "cuda" else block_size
    return _build_block_mask(layout, block_size, tile, torch.device(device))


def _build_block_mask(layout: BlockLayout, block_size: int, tile: int, device: torch.device) -> BlockMask:
    """A tile is "full" when all its blocks are set and it lies below the diagonal, "partial" when some are set
    otherwise. Counted from the layout's entries; the BlockMask itself is ``[1, H, C, C]`` (C tiles a side),
    FlexAttention's own form, and its ``mask_mod`` reads the layout as a grid: flex is the O(R^2) point of
    comparison, the other backends take the layout's rows."""
    H, R = layout.n_heads, layout.n_blocks
    N = R * block_size
    per = tile // block_size  # layout blocks per tile side
    C = N // tile  # tiles per side
    grid = layout.to_dense().to(device)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return grid[h, q_idx // block_size, kv_idx // block_size] & (kv_idx <= q_idx)

    row = layout.row_ids()
    at = (row // R * C + row % R // per) * C + layout.indices.long() // per  # flat (h, tile row, tile column)
    blocks = torch.bincount(at, minlength=H * C * C).view(H, C, C)  # layout blocks set in each tile
    below = torch.ones(C, C, dtype=torch.bool).tril(-1)  # tiles with no j > i in them
    full = (blocks == per * per) & below
    partial = (blocks > 0) & ~full

    def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(count (1, H, C), columns (1, H, C, C)): FlexAttention wants every row's column list C long."""
        count = tiles.sum(-1, dtype=torch.int32)
        columns = torch.sort((~tiles).to(torch.int8), dim=-1, stable=True).indices.int()  # the set ones first, ascending
        return count[None].to(device), columns[None].to(device)

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=tile, mask_mod=mask_mod, seq_lengths=(N, N)
    )
