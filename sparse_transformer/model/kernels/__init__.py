"""Attention backends. Each computes causal block-sparse attention with one signature:

    fn(q, k, v, layout, block_size, scale=None) -> out

q, k, v, out ``[B, H, N, D]``; layout a bool ``[H, N // block_size, N // block_size]`` causal block layout
whose diagonal tiles are masked element-wise. ``reference`` is the oracle the others are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparse_transformer.model.kernels.reference import reference_attention

AttentionFn = Callable[..., torch.Tensor]
BACKENDS = ("auto", "triton", "pieces", "blocks", "flex", "reference")


def get_backend(name: str, device: torch.device) -> AttentionFn:
    """The attention function for backend ``name``; ``auto`` is triton on CUDA, pieces on the CPU (PyTorch's
    fused flash kernel on unmasked pieces of the layout) and blocks elsewhere (e.g. Apple's MPS).

    Imports are lazy: Triton reads TRITON_INTERPRET when it is first imported.
    """
    if name == "auto":
        name = {"cuda": "triton", "cpu": "pieces"}.get(device.type, "blocks")
    if name == "reference":
        return reference_attention
    if name == "blocks":
        from sparse_transformer.model.kernels.blocks import blocks_attention

        return blocks_attention
    if name == "pieces":
        from sparse_transformer.model.kernels.pieces import pieces_attention

        return _pieces_eager if torch.compiler.is_compiling() else pieces_attention
    if name == "triton":
        from sparse_transformer.model.kernels.blocksparse import blocksparse_attention

        return blocksparse_attention
    if name == "flex":
        from sparse_transformer.model.kernels.flex import flex_attention

        return flex_attention
    raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")


@torch.compiler.disable
def _pieces_eager(*args, **kwargs) -> torch.Tensor:
    """pieces as one call that ``torch.compile`` leaves to eager mode: it plans its kernel calls in Python from
    cached per-layout tables, which Dynamo would trace through (and recompile on) but not fuse."""
    from sparse_transformer.model.kernels.pieces import pieces_attention

    return pieces_attention(*args, **kwargs)


def __getattr__(name: str):
    if name == "blocksparse_attention":
        from sparse_transformer.model.kernels.blocksparse import blocksparse_attention

        return blocksparse_attention
    raise AttributeError(name)
