"""Block-sparse attention on the CPU in C++ (``blocksparse_cpu.cpp``): flash attention over the layout's tiles.

The CPU default. Each query block (or a few consecutive ones, for blocks under 32) is a tile that reads the key
blocks its row of the layout lists, a chunk of up to 512 keys at a time: scores by BLAS GEMMs (one per run of
adjacent key blocks), masked only where a query block's own block is causal, and folded into a running softmax
as flash attention does. Nothing N x N is made and nothing is gathered; memory is q, k, v, the output and its
log-sum-exp. The backward recomputes the probabilities from the log-sum-exp, one (batch, head) per thread, so a
head's key gradients have one writer. Work is spread over torch's threads with OpenMP.

The kernel reads q, k, v at any strides (rows of D contiguous) and writes its output as ``(B, N, H, D)``:
``cpp_attention_qkv`` takes a fused projection's ``(B, N, 3, H, D)`` output where it lies and gives the output
projection its input as it is, and its backward writes the one ``(B, N, 3, H, D)`` gradient that projection
takes. So a layer copies none of q, k, v, the output or their gradients: at N = 2^20 and d = 192, 6 GiB less
at the peak of a step (``model/attention/sparse.py`` uses it when the backend is cpp).

It reaches dense SDPA's throughput per tile on the CPU (``bench/results/attention-cpu-sqrt.md``), which the
``pieces`` backend, made of calls to SDPA's own kernel, did not. Inputs of any floating dtype are computed in
fp32 (the output and gradients come back in the input's dtype): bf16 autocast pays in the model's linear layers,
not here. The kernel is compiled on first use (``build.py``); where it cannot be, ``auto`` uses ``pieces``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse_transformer.model.kernels.build import OPS_NAMESPACE, load
from sparse_transformer.model.kernels.checks import check_inputs
from sparse_transformer.model.kernels.lut import per_layout
from sparse_transformer.model.layout import BlockLayout

TILE_QUERIES = 32  # blocks under this are grouped, consecutive ones, into tiles of about this many queries
MAX_TILE_BLOCKS = 16  # a tile's query blocks are bits of an int32 per key block


@dataclass(frozen=True)
class Tiles:
    """Tiles of a layout: tile t holds query blocks ``rows[rows_ptr[t]:rows_ptr[t + 1]]`` (flat ``h * R + r``) and
    reads key blocks ``keys[keys_ptr[t]:keys_ptr[t + 1]]`` (flat, ascending), the i-th query block those whose
    ``seen`` has bit i. ``order`` visits them head by head (head h's from ``head_ptr[h]``), and within a head so
    that successive tiles share key blocks. All int32."""

    rows_ptr: torch.Tensor
    rows: torch.Tensor
    keys_ptr: torch.Tensor
    keys: torch.Tensor
    seen: torch.Tensor
    order: torch.Tensor  # the tiles in the order to visit them
    head_ptr: torch.Tensor

    def forward_args(self) -> tuple[torch.Tensor, ...]:
        return self.rows_ptr, self.rows, self.keys_ptr, self.keys, self.seen, self.order

    def backward_args(self) -> tuple[torch.Tensor, ...]:
        return *self.forward_args(), self.head_ptr


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call)."""
    return load()


def cpp_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of q, k, v ``[B, H, N, D]`` over the tiles of ``layout`` (H heads of N / bs blocks), on the CPU;
    the output is a ``[B, H, N, D]`` view of a ``(B, N, H, D)`` tensor."""
    layout = check_inputs(q, k, v, layout, block_size)
    scale = _check_cpu(q, scale)
    if layout.is_dense:  # every causal tile: SDPA's causal kernel, no tiles planned
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return _Attention.apply(q, k, v, _tiles(layout, block_size), block_size, scale)


def cpp_attention_qkv(qkv: torch.Tensor, layout: BlockLayout, block_size: int, scale: float | None = None) -> torch.Tensor:
    """``cpp_attention`` of a fused projection's output ``qkv`` ``(B, N, 3, H, D)``; returns ``(B, N, H, D)``. Copies
    nothing forward or backward: the gradient is one ``(B, N, 3, H, D)`` tensor, what the projection takes."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, N, 3, H, D]; got {list(qkv.shape)}")
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, D) views
    layout = check_inputs(q, k, v, layout, block_size)
    scale = _check_cpu(q, scale)
    if layout.is_dense:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)
    return _PackedAttention.apply(qkv, _tiles(layout, block_size), block_size, scale)


def _check_cpu(q: torch.Tensor, scale: float | None) -> float:
    """The scale to use, once the kernel can run on q's device."""
    if q.device.type != "cpu":
        raise ValueError(f"the cpp backend runs on the CPU; q is on {q.device} (use auto, triton or blocks there)")
    if not load():
        raise RuntimeError("the cpp backend's kernel could not be built here (see the warning); use pieces")
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


@per_layout
def _tiles(layout: BlockLayout, block_size: int) -> Tiles:
    """Consecutive query blocks in tiles of about TILE_QUERIES queries, each reading the union of its rows' keys.
    Made from the layout's entries, O(tiles), never from a grid."""
    H, R = layout.n_heads, layout.n_blocks
    G = max(1, min(MAX_TILE_BLOCKS, TILE_QUERIES // block_size))
    T = -(-R // G)  # tiles per head
    size = (R - torch.arange(T) * G).clamp(max=G)  # query blocks of each tile: the last of a head may be short
    row = layout.row_ids()  # flat h * R + r of each entry
    key = (row // R * T + row % R // G) * R + layout.indices.long()  # (flat tile, key block): ascending already
    if G == 1:
        seen = torch.ones(len(key), dtype=torch.int64)
    else:  # a tile reads the union of its rows' key blocks, each with a bit per row that reads it
        key, inverse = torch.unique(key, return_inverse=True)
        seen = torch.zeros(len(key), dtype=torch.int64).index_add_(0, inverse, 1 << (row % R % G))
    tile = key // R
    orders = []
    for h in range(H):
        # A head of column rows is visited by residue of the first row modulo its step: strided's rows r, r + s,
        # r + 2s, ... read nearly the same blocks, which then stay in cache between them (8% faster at N=8192).
        step = _column_step(layout, h) or R
        first = torch.arange(T) * G
        orders.append(h * T + torch.argsort(first % step * R + first))
    return Tiles(
        rows_ptr=_pointers(size.repeat(H)).int(),
        rows=torch.arange(H * R).int(),  # a head's tiles take its rows in order
        keys_ptr=_pointers(torch.bincount(tile, minlength=H * T)).int(),
        keys=(tile // T * R + key % R).int(),
        seen=seen.int(),
        order=torch.cat(orders).int(),
        head_ptr=(torch.arange(H + 1) * T).int(),
    )


def _pointers(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def _column_step(layout: BlockLayout, h: int) -> int | None:
    """For a head whose successive rows share few key blocks but whose rows read blocks at a common step
    (strided's column rule): that step, the gap most rows leave between the blocks they read; else None."""
    R = layout.n_blocks
    if R < 2:
        return None
    count = layout.counts()[h]
    cols = layout.indices[layout.indptr[h * R] : layout.indptr[(h + 1) * R]].long()
    r = torch.arange(R).repeat_interleave(count)
    key = r * R + cols  # ascending
    previous = (r - 1) * R + cols  # the same block in the row before
    found = key[torch.searchsorted(key, previous).clamp(max=len(key) - 1)] == previous
    shared = torch.bincount(r[found & (r > 0)], minlength=R)[1:] / count[1:]  # of each row's blocks, those its predecessor reads
    if shared.mean() >= 0.5:
        return None
    gaps = (cols[1:] - cols[:-1])[r[1:] == r[:-1]]
    if len(gaps) == 0:
        return None
    values, counts = gaps.unique(return_counts=True)
    step = int(values[counts.argmax()])
    return step if step > 1 and 2 * int(counts.max()) >= len(gaps) else None


def _ops():
    return getattr(torch.ops, OPS_NAMESPACE)


def _fp32_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 with rows of D contiguous, what the kernel reads: no copy for an fp32 projection's output."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: Tiles, block_size: int, scale: float):
    """The kernel's output ``(B, N, H, D)`` fp32 and log-sum-exp ``(B, H * N)`` for fp32 views q, k, v ``(B, H, N, D)``."""
    B, H, N, D = q.shape
    out = torch.empty(B, N, H, D, dtype=torch.float32)  # fp32, not the default dtype (bf16-true sets it)
    lse = torch.empty(B, H * N, dtype=torch.float32)
    _ops().forward(q, k, v, out.transpose(1, 2), lse, *tiles.forward_args(), block_size, scale)
    return out, lse


def _backward(grad, q, k, v, out, lse, dq, dk, dv, tiles: Tiles, block_size: int, scale: float) -> None:
    """dq, dk, dv (views like q) of the upstream ``grad`` ``(B, N, H, D)``, for the output ``out`` ``(B, N, H, D)``."""
    g = _fp32_rows(grad).transpose(1, 2)
    _ops().backward(g, q, k, v, out.transpose(1, 2), lse, dq, dk, dv, *tiles.backward_args(), block_size, scale)


class _Attention(torch.autograd.Function):
    """q, k, v ``(B, H, N, D)``, each its own tensor -> out, a ``(B, H, N, D)`` view of ``(B, N, H, D)``."""

    @staticmethod
    def forward(ctx, q, k, v, tiles: Tiles, block_size: int, scale: float):
        qf, kf, vf = (_fp32_rows(t) for t in (q, k, v))
        out, lse = _forward(qf, kf, vf, tiles, block_size, scale)
        ctx.save_for_backward(qf, kf, vf, out, lse)
        ctx.tiles, ctx.block_size, ctx.scale, ctx.dtype = tiles, block_size, scale, q.dtype
        return out.to(q.dtype).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        qf, kf, vf, out, lse = ctx.saved_tensors
        B, H, N, D = qf.shape
        grads = [torch.empty(B, N, H, D, dtype=torch.float32).transpose(1, 2) for _ in range(3)]
        _backward(grad.transpose(1, 2), qf, kf, vf, out, lse, *grads, ctx.tiles, ctx.block_size, ctx.scale)
        return (*(g.to(ctx.dtype) for g in grads), None, None, None)


class _PackedAttention(torch.autograd.Function):
    """qkv ``(B, N, 3, H, D)`` -> out ``(B, N, H, D)``; the gradient one ``(B, N, 3, H, D)`` tensor."""

    @staticmethod
    def forward(ctx, qkv, tiles: Tiles, block_size: int, scale: float):
        qkvf = _fp32_rows(qkv)
        out, lse = _forward(*qkvf.permute(2, 0, 3, 1, 4), tiles, block_size, scale)
        ctx.save_for_backward(qkvf, out, lse)
        ctx.tiles, ctx.block_size, ctx.scale, ctx.dtype = tiles, block_size, scale, qkv.dtype
        return out.to(qkv.dtype)

    @staticmethod
    def backward(ctx, grad):
        qkvf, out, lse = ctx.saved_tensors
        dqkv = torch.empty(qkvf.shape, dtype=torch.float32)
        _backward(grad, *qkvf.permute(2, 0, 3, 1, 4), out, lse, *dqkv.permute(2, 0, 3, 1, 4), ctx.tiles, ctx.block_size, ctx.scale)
        return dqkv.to(ctx.dtype), None, None, None
