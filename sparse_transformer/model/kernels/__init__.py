"""Attention backends. Each computes causal block-sparse attention with one signature:

    fn(q, k, v, layout, block_size, scale=None) -> out

q, k, v, out ``[B, H, N, D]``; layout a :class:`~sparse_transformer.model.layout.BlockLayout` of H heads of
N // block_size blocks, the key blocks each query block reads (a bool ``[H, R, R]`` grid is taken too, for
hand-made layouts at small N), whose diagonal tiles are masked element-wise. ``reference`` is the oracle the
others are tested against.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Literal

import torch

from sparse_transformer.model.kernels import build

AttentionFn = Callable[..., torch.Tensor]

# name -> where its function lives. Imported on first use: Triton reads TRITON_INTERPRET when it is first
# imported, and a CPU run never needs it.
BACKENDS: dict[str, str] = {
    "triton": "sparse_transformer.model.kernels.blocksparse:blocksparse_attention",
    "cpp": "sparse_transformer.model.kernels.cpp:cpp_attention",
    "pieces": "sparse_transformer.model.kernels.pieces:pieces_attention",
    "blocks": "sparse_transformer.model.kernels.blocks:blocks_attention",
    "flex": "sparse_transformer.model.kernels.flex:flex_attention",
    "reference": "sparse_transformer.model.kernels.reference:reference_attention",
}
AUTO = {"cuda": "triton", "cpu": "cpp"}  # what ``auto`` picks on a device; ``blocks`` elsewhere (e.g. Apple's MPS)
Backend = Literal[("auto", *BACKENDS)]  # a config's choice, as the CLI lists it


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend ``name`` stands for on ``device``: itself, or ``auto``'s pick. On the CPU that is the C++
    kernel, built on first use; where it cannot be built, ``pieces`` (PyTorch's flash kernel on pieces)."""
    if name != "auto":
        return name
    picked = AUTO.get(device.type, "blocks")
    return "pieces" if picked == "cpp" and not build.load() else picked


# On CUDA the Triton kernel is checked against the reference on its first call for a shape (selfcheck.py): asked
# for by name, a failure stops the run; picked by ``auto``, FlexAttention takes over.
CHECKED_TRITON = {
    "triton": "sparse_transformer.model.kernels.selfcheck:verified_triton",
    "auto": "sparse_transformer.model.kernels.selfcheck:triton_or_flex",
}


def get_backend(name: str, device: torch.device) -> AttentionFn:
    """The attention function of backend ``name`` (or ``auto``) on ``device``."""
    resolved = resolve_backend(name, device)
    if resolved not in BACKENDS:
        raise ValueError(f"attention backend {resolved!r} is not one of auto, {', '.join(BACKENDS)}")
    if resolved == "triton" and device.type == "cuda":
        return _load(CHECKED_TRITON[name])
    return load_backend(resolved)


# Backends with an entry for a fused projection's output ``qkv`` ``(B, N, 3, H, D)`` that returns ``(B, N, H, D)``
# and copies nothing: fn(qkv, layout, block_size, scale=None).
PACKED: dict[str, str] = {"cpp": "sparse_transformer.model.kernels.cpp:cpp_attention_qkv"}


def get_packed_backend(name: str, device: torch.device) -> AttentionFn | None:
    """The packed-qkv entry of backend ``name`` (or ``auto``'s pick) on ``device``, or None where it has none."""
    resolved = resolve_backend(name, device)
    return _load(PACKED[resolved]) if resolved in PACKED else None


def load_backend(name: str) -> AttentionFn:
    """Backend ``name``'s own function, unchecked."""
    return _load(BACKENDS[name])


def _load(where: str) -> AttentionFn:
    module, function = where.split(":")
    return getattr(importlib.import_module(module), function)
