"""Block-sparse attention in plain PyTorch: gather each query block's key blocks, then batched matmuls.

The CPU default backend. Each query block reads only the key blocks its row of the layout lists
(``lut.layout_tables``), so time and memory follow the number of non-zero tiles on any device and
no N x N tensor is ever built. Rows are padded to the widest row; padding slots are masked out and the
diagonal slot gets the element-wise causal mask. Autograd differentiates it end to end.
"""

from __future__ import annotations

import math

import torch

from sparse_transformer.kernels.checks import check_inputs
from sparse_transformer.kernels.lut import layout_tables


def blocks_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of q, k, v ``[B, H, N, D]`` over the tiles of ``layout`` ``[H, N/bs, N/bs]``.

    The matmuls run in the input dtype; scaling, masking and softmax run in fp32 and the probabilities are
    cast back, so fp16/bf16 stay stable. Memory is O(B * H * N * width * (block_size + D)), width being the widest row of the layout.
    Keep the layout on q's device: the tables are cached per layout tensor.
    """
    check_inputs(q, k, v, layout, block_size)
    B, H, N, D = q.shape
    R, bs = N // block_size, block_size
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    rows = layout_tables(layout).rows
    index = rows.index.to(q.device, torch.long)  # (H, R, W)
    count = rows.count.to(q.device)  # (H, R)
    W = index.shape[-1]

    # Gather the key and value blocks each query block reads: (B, H, R, W, bs, D) -> (B, H, R, W*bs, D).
    heads = torch.arange(H, device=q.device)[:, None, None]  # (H, 1, 1)
    kg = k.unflatten(2, (R, bs))[:, heads, index].flatten(3, 4)  # (B, H, R, W*bs, D)
    vg = v.unflatten(2, (R, bs))[:, heads, index].flatten(3, 4)  # (B, H, R, W*bs, D)
    qb = q.unflatten(2, (R, bs))  # (B, H, R, bs, D)

    # Which gathered keys each query may see: real slots only, and j <= i inside the diagonal tile.
    slot = torch.arange(W, device=q.device)
    real = slot < count[..., None]  # (H, R, W)
    diagonal = index == torch.arange(R, device=q.device)[:, None]  # (H, R, W)
    pos = torch.arange(bs, device=q.device)
    causal = pos[:, None] >= pos[None, :]  # (bs, bs) query x key
    keep = real[:, :, None, :, None] & (~diagonal[:, :, None, :, None] | causal[:, None, :])  # (H, R, bs, W, bs)
    keep = keep.flatten(3, 4)  # (H, R, bs, W*bs)

    scores = torch.matmul(qb, kg.transpose(-1, -2)).float() * scale  # (B, H, R, bs, W*bs)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, vg)  # (B, H, R, bs, D)
    return out.flatten(2, 3)  # (B, H, N, D)
