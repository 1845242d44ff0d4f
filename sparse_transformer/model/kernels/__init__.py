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
BACKENDS = ("auto", "triton", "cpp", "pieces", "blocks", "flex", "reference")


def get_backend(name: str, device: torch.device) -> AttentionFn:
    """The attention function for backend ``name``; ``auto`` is triton on CUDA, cpp on the CPU (the C++ kernel,
    built on first use; pieces, PyTorch's fused flash kernel on pieces of the layout, where it cannot be built)
    and blocks elsewhere (e.g. Apple's MPS).

    Imports are lazy: Triton reads TRITON_INTERPRET when it is first imported.
    """
    if name == "auto":
        name = {"cuda": "triton", "cpu": "cpp"}.get(device.type, "blocks")
        if name == "cpp":
            from sparse_transformer.model.kernels.cpp import available

            name = "cpp" if available() else "pieces"
    if name == "reference":
        return reference_attention
    if name == "blocks":
        from sparse_transformer.model.kernels.blocks import blocks_attention

        return blocks_attention
    if name == "cpp":
        from sparse_transformer.model.kernels.cpp import cpp_attention

        return cpp_attention
    if name == "pieces":
        from sparse_transformer.model.kernels.pieces import pieces_attention

        return pieces_attention
    if name == "triton":
        from sparse_transformer.model.kernels.blocksparse import blocksparse_attention

        return blocksparse_attention
    if name == "flex":
        from sparse_transformer.model.kernels.flex import flex_attention

        return flex_attention
    raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")


def __getattr__(name: str):
    if name == "blocksparse_attention":
        from sparse_transformer.model.kernels.blocksparse import blocksparse_attention

        return blocksparse_attention
    raise AttributeError(name)
