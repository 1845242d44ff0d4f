"""Input checks shared by the attention backends: refuse what a kernel would silently get wrong."""

from __future__ import annotations

import torch

from sparse_transformer.model.kernels.lut import per_layout


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, block_size: int) -> None:
    """Raise a one-line ValueError naming the offending value and what is allowed.

    q, k, v must share one floating ``[B, H, N, D]`` shape, dtype and device; ``layout`` must be a bool
    ``[H, N / block_size, N / block_size]`` with no tile above the diagonal and every diagonal tile set.
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
    check_layout(layout, (H, N // block_size, N // block_size))


def check_layout(layout: torch.Tensor, shape: tuple[int, int, int]) -> None:
    """Refuse a layout of the wrong dtype, shape or content; the content checks run once per layout."""
    if layout.dtype != torch.bool:
        raise ValueError(f"layout dtype {layout.dtype} is not supported; use torch.bool")
    if tuple(layout.shape) != shape:
        raise ValueError(f"layout shape {list(layout.shape)} is not [H, N/block_size, N/block_size] = {list(shape)}")
    _check_content(layout)


@per_layout
def causal_dense(layout: torch.Tensor) -> bool:
    """Every causal tile set: one causal SDPA call over the whole sequence is the whole work, and a backend
    need plan nothing. Cached like the content checks."""
    R = layout.shape[-1]
    return bool((layout.cpu() == torch.ones(R, R, dtype=torch.bool).tril()).all())


@per_layout
def _check_content(layout: torch.Tensor) -> bool:
    """Causal with every diagonal tile set; cached, so a layout costs one device sync, not one per call."""
    above = layout.triu(1).nonzero()
    if len(above):
        h, r, c = above[0].tolist()
        raise ValueError(f"layout is not causal: head {h} has tile ({r}, {c}) above the diagonal")
    missing = (~layout.diagonal(dim1=1, dim2=2)).nonzero()
    if len(missing):
        h, r = missing[0].tolist()
        raise ValueError(f"layout head {h} query block {r} lacks its diagonal tile; every query attends to itself")
    return True
