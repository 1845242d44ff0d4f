"""The oracle: block-sparse causal attention as dense masked softmax. O(N^2) time and memory."""

from __future__ import annotations

import math

import torch

from sparse_transformer.model.layout import BlockLayout, element_mask


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout | torch.Tensor, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Attention of q, k, v ``[B, H, N, D]`` restricted to the tiles of ``layout`` (H heads of N / bs blocks).

    Computed in fp32 whatever the input dtype, so it can judge the low-precision backends.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = element_mask(layout, block_size).to(q.device)  # (H, N, N)
    scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", probs, v.float()).to(q.dtype)
