"""Block-sparse causal attention in Triton: FlashAttention-2 that visits only the tiles of a layout.

Each program owns one (batch, head, block) and walks a lookup table (``lut.py``) of the tiles it needs, so
the work is proportional to the number of non-zero tiles and no N x N buffer is ever formed:

- forward: per query block, the key blocks of its row; online softmax in base 2 (``exp2`` with
  log2(e) * scale folded into the scores), fp32 accumulators; saves the row log-sum-exp.
- backward: delta = rowsum(dO * O), then dK, dV per key block over the query blocks of its column, then
  dQ per query block over its row. Separate passes, so no atomics and deterministic gradients.
- both are ``torch.library.triton_op`` custom operators with their autograd registered, so torch.compile
  keeps each kernel whole inside a compiled model.

A causal layout with its diagonal set puts the diagonal tile last in each row and first in each column;
only that tile is masked element-wise (j <= i).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from sparse_transformer.model.kernels.checks import check_inputs
from sparse_transformer.model.kernels.lut import LayoutTables, layout_tables
from sparse_transformer.model.layout import BlockLayout

BLOCK_SIZES = (16, 32, 64, 128)
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))

# Triton picks the interpreter when a kernel is decorated, i.e. when this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _patch_interpreter_index() -> None:
    """Loop bounds read from the tables are 1-element arrays in Triton 3.6's interpreter, which converts them
    with int(array); NumPy >= 2.4 refuses that (triton-lang/triton#9171). Convert with .item() instead."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


if _INTERPRET:
    _patch_interpreter_index()


def _configs() -> list[triton.Config]:
    """A few launch configs to tune on GPU; the interpreter cannot autotune, so it gets one."""
    if _INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]


_TUNE_KEY = ["N_CTX", "HEAD_DIM", "BLOCK"]  # the autotuner adds the dtypes of the tensor arguments


@triton.jit
def _tile(base, stride_n, start, offs, offs_d):
    """Pointers to rows ``start + offs`` of an (N, D) slice whose last dim is contiguous."""
    return base + (start + offs)[:, None] * stride_n + offs_d[None, :]


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs, qk_scale, DIAGONAL: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one key tile into the running softmax of a query block; returns (acc, l_i, m_i)."""
    k = tl.load(k_ptrs)  # (BLOCK, D)
    v = tl.load(v_ptrs)  # (BLOCK, D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK, BLOCK), log2 units
    if DIAGONAL:
        s = tl.where(offs[:, None] >= offs[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # rescales what earlier tiles accumulated
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, ROW_INDEX, ROW_COUNT, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, N_CTX, LUT_WIDTH,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    m = tl.program_id(0)  # query block
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    row = h * (N_CTX // BLOCK) + m
    lut = ROW_INDEX + row * LUT_WIDTH
    count = tl.load(ROW_COUNT + row)

    q = tl.load(_tile(Q, stride_qn, m * BLOCK, offs, offs_d))  # (BLOCK, D)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for i in range(count - 1):  # key blocks strictly below the diagonal: no mask
        start_n = tl.load(lut + i) * BLOCK
        k_ptrs, v_ptrs = _tile(K, stride_kn, start_n, offs, offs_d), _tile(V, stride_vn, start_n, offs, offs_d)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs, qk_scale, False, PRECISION)
    k_ptrs, v_ptrs = _tile(K, stride_kn, m * BLOCK, offs, offs_d), _tile(V, stride_vn, m * BLOCK, offs, offs_d)
    acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs, qk_scale, True, PRECISION)

    O += bh * N_CTX * HEAD_DIM  # O and LSE are contiguous
    tl.store(_tile(O, HEAD_DIM, m * BLOCK, offs, offs_d), (acc / l_i[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + bh * N_CTX + m * BLOCK + offs, m_i + tl.math.log2(l_i))  # log2 units


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, stride_db, stride_dh, stride_dn, H, N_CTX, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr
):
    """delta_i = sum_d dO_id * O_id, the softmax-backward term shared by every key of row i."""
    m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(_tile(O + bh * N_CTX * HEAD_DIM, HEAD_DIM, m * BLOCK, offs, offs_d))
    do = tl.load(_tile(DO + (bh // H) * stride_db + (bh % H) * stride_dh, stride_dn, m * BLOCK, offs, offs_d))
    tl.store(DELTA + bh * N_CTX + m * BLOCK + offs, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1))


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, offs, qk_scale,
    DIAGONAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Add one query tile's contribution to dK, dV of a key block; works on transposed scores (keys x queries)."""
    q = tl.load(q_ptrs)  # (BLOCK, D)
    do = tl.load(do_ptrs)  # (BLOCK, D)
    lse = tl.load(lse_ptrs)  # (BLOCK,)
    delta = tl.load(delta_ptrs)  # (BLOCK,)
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])  # (BLOCK, BLOCK)
    if DIAGONAL:
        p_t = tl.where(offs[None, :] >= offs[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, COL_INDEX, COL_COUNT, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
    H, N_CTX, LUT_WIDTH,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    n = tl.program_id(0)  # key block
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_db + h * stride_dh
    LSE += bh * N_CTX
    DELTA += bh * N_CTX
    col = h * (N_CTX // BLOCK) + n
    lut = COL_INDEX + col * LUT_WIDTH
    count = tl.load(COL_COUNT + col)

    k = tl.load(_tile(K + b * stride_kb + h * stride_kh, stride_kn, n * BLOCK, offs, offs_d))  # (BLOCK, D)
    v = tl.load(_tile(V + b * stride_vb + h * stride_vh, stride_vn, n * BLOCK, offs, offs_d))  # (BLOCK, D)
    dk = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dk, dv = _bwd_dkdv_tile(
        dk, dv, k, v, _tile(Q, stride_qn, n * BLOCK, offs, offs_d), _tile(DO, stride_dn, n * BLOCK, offs, offs_d),
        LSE + n * BLOCK + offs, DELTA + n * BLOCK + offs, offs, qk_scale, True, PRECISION,
    )
    for i in range(1, count):  # query blocks strictly below the diagonal: no mask
        start_m = tl.load(lut + i) * BLOCK
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, _tile(Q, stride_qn, start_m, offs, offs_d), _tile(DO, stride_dn, start_m, offs, offs_d),
            LSE + start_m + offs, DELTA + start_m + offs, offs, qk_scale, False, PRECISION,
        )

    out = bh * N_CTX * HEAD_DIM  # DK and DV are contiguous
    tl.store(_tile(DK + out, HEAD_DIM, n * BLOCK, offs, offs_d), (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(_tile(DV + out, HEAD_DIM, n * BLOCK, offs, offs_d), dv.to(DV.dtype.element_ty))


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, offs, qk_scale, DIAGONAL: tl.constexpr, PRECISION: tl.constexpr
):
    """Add one key tile's contribution to dQ of a query block."""
    k = tl.load(k_ptrs)  # (BLOCK, D)
    v = tl.load(v_ptrs)  # (BLOCK, D)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])  # (BLOCK, BLOCK)
    if DIAGONAL:
        p = tl.where(offs[:, None] >= offs[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, ROW_INDEX, ROW_COUNT, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
    H, N_CTX, LUT_WIDTH,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    m = tl.program_id(0)  # query block
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    row = h * (N_CTX // BLOCK) + m
    lut = ROW_INDEX + row * LUT_WIDTH
    count = tl.load(ROW_COUNT + row)

    q = tl.load(_tile(Q + b * stride_qb + h * stride_qh, stride_qn, m * BLOCK, offs, offs_d))  # (BLOCK, D)
    do = tl.load(_tile(DO + b * stride_db + h * stride_dh, stride_dn, m * BLOCK, offs, offs_d))  # (BLOCK, D)
    lse = tl.load(LSE + bh * N_CTX + m * BLOCK + offs)  # (BLOCK,)
    delta = tl.load(DELTA + bh * N_CTX + m * BLOCK + offs)  # (BLOCK,)
    dq = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    for i in range(count - 1):  # key blocks strictly below the diagonal: no mask
        start_n = tl.load(lut + i) * BLOCK
        k_ptrs, v_ptrs = _tile(K, stride_kn, start_n, offs, offs_d), _tile(V, stride_vn, start_n, offs, offs_d)
        dq = _bwd_dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs, qk_scale, False, PRECISION)
    k_ptrs, v_ptrs = _tile(K, stride_kn, m * BLOCK, offs, offs_d), _tile(V, stride_vn, m * BLOCK, offs, offs_d)
    dq = _bwd_dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs, qk_scale, True, PRECISION)

    DQ += bh * N_CTX * HEAD_DIM  # contiguous
    tl.store(_tile(DQ, HEAD_DIM, m * BLOCK, offs, offs_d), (dq * sm_scale).to(DQ.dtype.element_ty))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and position strides of a ``[B, H, N, D]`` tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Views such as ``qkv.view(B, N, H, D).transpose(1, 2)`` pass through; only a strided last dim is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, which need not be the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get three-pass TF32 products (near-fp32 accuracy, on tensor cores), so they match the fp32
    oracle; plain fp32 ("ieee") dots need more shared memory than an H100 has at block 128, D 128."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _launch(kernel):
    """A kernel as ``torch.compile`` sees it (``wrap_triton``), so Inductor schedules it whole; the interpreter's
    kernels are not JIT functions, and run as they are."""
    return kernel if _INTERPRET else wrap_triton(kernel)


# Custom operators (torch.library): torch.compile keeps each one whole, one Triton kernel per pass, instead of
# stopping at an opaque autograd.Function. Their fake (shape) implementation is the function itself, traced.
@triton_op("sparse_transformer::blocksparse_forward", mutates_args=())
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_index: torch.Tensor, row_count: torch.Tensor,
    col_index: torch.Tensor, col_count: torch.Tensor, block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and row log2-sum-exp2 ``[B, H, N]``; the column tables ride along for the backward."""
    B, H, N, D = q.shape
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)  # log2-sum-exp2 of each row
    grid = (N // block_size, B * H)
    with _on(q.device):
        _launch(_fwd_kernel)[grid](
            q, k, v, o, lse, row_index, row_count, scale * LOG2E.value,
            *_strides(q), *_strides(k), *_strides(v), H, N, row_index.shape[-1],
            HEAD_DIM=D, BLOCK=block_size, PRECISION=_precision(q.dtype),
        )
    return o, lse


@triton_op("sparse_transformer::blocksparse_backward", mutates_args=())
def _backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    row_index: torch.Tensor, row_count: torch.Tensor, col_index: torch.Tensor, col_count: torch.Tensor,
    block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv: delta, then dK and dV per key block over its column, then dQ per query block over its row."""
    B, H, N, D = q.shape
    delta = torch.empty_like(lse)  # (B, H, N)
    dq, dk, dv = (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))
    grid = (N // block_size, B * H)
    common = dict(HEAD_DIM=D, BLOCK=block_size, PRECISION=_precision(q.dtype))
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    with _on(q.device):
        _launch(_bwd_delta_kernel)[grid](o, do, delta, *_strides(do), H, N, HEAD_DIM=D, BLOCK=block_size)
        _launch(_bwd_dkdv_kernel)[grid](
            q, k, v, do, dk, dv, lse, delta, col_index, col_count, scale,
            *strides, H, N, col_index.shape[-1], **common,
        )
        _launch(_bwd_dq_kernel)[grid](
            q, k, v, do, dq, lse, delta, row_index, row_count, scale,
            *strides, H, N, row_index.shape[-1], **common,
        )
    return dq, dk, dv


def _save_for_backward(ctx, inputs, output) -> None:
    q, k, v, row_index, row_count, col_index, col_count, block_size, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, row_index, row_count, col_index, col_count)
    ctx.block_size, ctx.scale = block_size, scale
    ctx.mark_non_differentiable(lse)


def _gradients(ctx, do, _dlse):
    q, k, v, o, lse, row_index, row_count, col_index, col_count = ctx.saved_tensors
    dq, dk, dv = _backward(
        q, k, v, o, lse, _rows_contiguous(do), row_index, row_count, col_index, col_count, ctx.block_size, ctx.scale
    )
    return dq, dk, dv, None, None, None, None, None, None


_forward.register_autograd(_gradients, setup_context=_save_for_backward)


def _check_triton(q: torch.Tensor, block_size: int) -> None:
    """What this kernel supports beyond the checks every backend makes (``checks.py``)."""
    if q.dtype not in DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"the triton backend needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1 set before triton is "
            "imported; on CPU use the 'blocks' or 'reference' backend"
        )
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size} is not supported; use one of {BLOCK_SIZES}")
    if q.dim() == 4 and q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim D={q.shape[-1]} is not supported; use one of {HEAD_DIMS}")


def blocksparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of q, k, v ``[B, H, N, D]`` over the tiles of ``layout`` (H heads of N / bs blocks).

    Differentiable in q, k, v. ``scale`` defaults to 1/sqrt(D). The lookup tables are cached per layout and
    device.
    """
    tables = _checked_tables(q, k, v, layout, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    rows, cols = tables.rows, tables.cols
    o, _ = _forward(q, k, v, rows.index, rows.count, cols.index, cols.count, block_size, scale)
    return o


@torch.compiler.disable
def _checked_tables(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, block_size: int) -> LayoutTables:
    """The checks and the cached tables, in eager mode: they read the layout's values once per layout, which a
    compiled graph would have to guard on."""
    _check_triton(q, block_size)
    return layout_tables(check_inputs(q, k, v, layout, block_size), q.device)
