"""Block-sparse attention in plain PyTorch: gather each query block's key blocks, then batched matmuls.

What ``auto`` runs on a device with no kernel of its own (Apple's MPS). Each query block reads only the key blocks its row of the layout lists
(``lut.layout_tables``), so time and memory follow the number of non-zero tiles on any device and
no N x N tensor is ever built. Rows are padded to the widest row of their chunk; padding slots are masked
out and the diagonal slot gets the element-wise causal mask. Autograd differentiates it end to end.
"""

from __future__ import annotations

import math

import torch

from sparse_transformer.model.kernels.checks import check_inputs
from sparse_transformer.model.kernels.lut import layout_tables, per_layout
from sparse_transformer.model.layout import BlockLayout

# Rows of a causal layout widen with the row index, so padding every row to the widest one would waste
# about half the work on a dense layout. Padding each of a few chunks of rows to its own width wastes ~1/8.
ROW_CHUNKS = 8


def blocks_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of q, k, v ``[B, H, N, D]`` over the tiles of ``layout`` (H heads of N / bs blocks).

    The matmuls run in the input dtype (q scaled first); masking and softmax run in fp32 and the
    probabilities are cast back, so fp16/bf16 stay stable. Memory is O(B * H * N * width * (block_size + D)), width being the
    widest row of the layout. The tables are cached per layout, on q's device.
    """
    layout = check_inputs(q, k, v, layout, block_size)
    B, H, N, D = q.shape
    R, bs = N // block_size, block_size
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    qb = (q * scale).unflatten(2, (R, bs))  # (B, H, R, bs, D); scaling q is cheaper than scaling the scores
    kb = k.reshape(B, H * R, bs, D)  # (B, H*R, bs, D): the key blocks of every head on one axis to gather on
    vb = v.reshape(B, H * R, bs, D)

    index, count, chunks = _row_plan(layout, q.device)
    out = [_attend_rows(qb[:, :, a:b], kb, vb, index[:, a:b, :w], count[:, a:b]) for a, b, w in chunks]
    return torch.cat(out, dim=2).flatten(2, 3)  # (B, H, N, D)


@per_layout
def _row_plan(layout: BlockLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """What depends on the layout alone, built once per layout: the row table with each row's diagonal moved
    to slot 0, its counts, and the row chunks as (first, end, width)."""
    rows = layout_tables(layout, device).rows
    index = rows.index.long()  # (H, R, width)
    count = rows.count  # (H, R)
    # Rows list their columns ascending, so the diagonal (set, and the last column of a causal row) is the
    # last real slot. Move it to slot 0, where one small broadcast mask makes every diagonal tile causal.
    slot = torch.arange(index.shape[-1], device=device)
    last = count[..., None] - 1  # (H, R, 1)
    index = index.gather(-1, torch.where(slot == 0, last, torch.where(slot <= last, slot - 1, slot)))

    R = layout.n_blocks
    n_chunks = min(R, ROW_CHUNKS)
    bounds = [R * c // n_chunks for c in range(n_chunks + 1)]
    spans = list(zip(bounds[:-1], bounds[1:]))
    widths = torch.stack([count[:, a:b].max() for a, b in spans]).tolist()  # one device sync for all chunks
    return index, count, [(a, b, w) for (a, b), w in zip(spans, widths)]


def _attend_rows(
    q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, index: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """Attention of the query blocks in q ``(B, H, r, bs, D)`` to the key blocks that ``index`` ``(H, r, w)``
    lists, the diagonal one first, of which the first ``count`` ``(H, r)`` are real."""
    B, H, r, bs, D = q.shape
    R, w = kb.shape[1] // H, index.shape[-1]

    # index_select rather than advanced indexing: its backward (index_add) is several times faster on CPU.
    flat = (torch.arange(H, device=q.device)[:, None, None] * R + index).flatten()  # (H*r*w,)
    kg = kb.index_select(1, flat).view(B, H, r, w * bs, D)  # (B, H, r, w*bs, D)
    vg = vb.index_select(1, flat).view(B, H, r, w * bs, D)  # (B, H, r, w*bs, D)

    # Biases of 0 and -inf that broadcast over the scores rather than match their size: padding slots, and keys
    # j > i of the diagonal tile in slot 0. Added in place: the matmul's backward does not need its output, and
    # unlike masked_fill an addition passes the gradient through without a copy.
    padding = (torch.arange(w, device=q.device) >= count[..., None]).repeat_interleave(bs, -1)  # (H, r, w*bs)
    key = torch.arange(w * bs, device=q.device)[None, :]  # (1, w*bs)
    future = (key > torch.arange(bs, device=q.device)[:, None]) & (key < bs)  # (bs, w*bs)
    scores = torch.matmul(q, kg.transpose(-1, -2)).float()  # (B, H, r, bs, w*bs), fp32 whatever the input
    scores.add_(_bias(padding)[:, :, None]).add_(_bias(future))
    probs = torch.softmax(scores, dim=-1).to(vg.dtype)
    return torch.matmul(probs, vg)  # (B, H, r, bs, D)


def _bias(mask: torch.Tensor) -> torch.Tensor:
    """-inf where ``mask`` is set, else 0, in fp32 like the scores."""
    return torch.where(mask, float("-inf"), 0.0).float()
