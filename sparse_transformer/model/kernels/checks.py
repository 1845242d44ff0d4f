"""Input checks shared by the attention backends: refuse what a kernel would silently get wrong."""

from __future__ import annotations

import torch

from sparse_transformer.model.layout import BlockLayout, as_layout


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout | torch.Tensor, block_size: int
) -> BlockLayout:
    """The layout as a :class:`BlockLayout` (a bool ``[H, R, R]`` grid is converted), once the inputs pass; else a
    one-line ValueError naming the offending value and what is allowed.

    q, k, v must share one floating ``[B, H, N, D]`` shape, dtype and device; the layout must have H heads of
    N / block_size blocks (a ``BlockLayout`` is causal with every diagonal tile by construction).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one [B, H, N, D] shape; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    if not q.is_floating_point():
        raise ValueError(f"dtype {q.dtype} is not supported; use a floating dtype such as torch.float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is not supported; use a positive int")
    B, H, N, D = q.shape
    if N % block_size:
        raise ValueError(f"sequence length N={N} is not a multiple of block_size={block_size}")
    layout = as_layout(layout)
    if layout.shape != (H, N // block_size, N // block_size):
        raise ValueError(f"layout shape {list(layout.shape)} is not [H, N/block_size, N/block_size] = {[H, N // block_size, N // block_size]}")
    return layout
