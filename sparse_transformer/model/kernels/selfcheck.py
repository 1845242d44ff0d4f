"""Backends tried before they are trusted, on tiny cases that take milliseconds once compiled.

- :func:`try_backend`: whether a backend runs at all on a device in a dtype, forward and backward: the CLI asks
  when it reads the config, so a backend the device cannot run (``triton`` on a CPU without its interpreter,
  ``flex``, which has no CPU backward) or a precision the kernel cannot take is one line, not a traceback in
  the first backward.
- :func:`verified_triton` and :func:`triton_or_flex`: what ``get_backend`` gives for the Triton kernel on CUDA.
  Written and tested under Triton's interpreter, the kernel may not compile, or may compile wrong, on a GPU,
  driver or Triton release it has not met. So the first call for each (device, dtype, head dim, block size)
  runs it forward and backward on a tiny random case (2 heads, 4 blocks) against the fp32 reference and keeps
  the verdict for the process. If it fails, ``backend: triton`` stops the run in one line; ``backend: auto``
  says so in one line and uses FlexAttention instead.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch

from sparse_transformer.errors import InputError
from sparse_transformer.model.kernels import load_backend
from sparse_transformer.model.kernels.reference import reference_attention
from sparse_transformer.model.layout import BlockLayout

# Largest error allowed, as a share of the reference's largest value (at least 1): the kernel tests' bounds, with
# room; a kernel that compiled wrong is off by far more.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
_verdicts: dict[tuple, str | None] = {}  # (device, dtype, head dim, block size) -> None (agrees) or what went wrong
_fell_back: set[tuple] = set()  # the shape classes flex took over, said once each


def try_backend(
    attend: Callable[..., torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    layout: BlockLayout | None = None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> str | None:
    """What goes wrong when ``attend`` runs forward (inside ``context()``: a precision's autocast or default dtype)
    and backward on a tiny case (on ``layout``, a small one of the run's pattern, if given); None if nothing does."""
    q, k, v, layout = _case(device, dtype, head_dim, block_size, layout)
    try:
        with context():
            out = attend(q, k, v, layout, block_size)
        out.backward(torch.ones_like(out))
    except Exception as e:  # whatever the backend raises is the answer
        return _one_line(e)
    return None


def disagreement(attend: Callable[..., torch.Tensor], device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """How ``attend``'s output and gradients differ from the fp32 reference's on a tiny case, beyond
    ``TOLERANCE``, or what it raised; None if they agree."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        q, k, v, layout = _case(device, dtype, head_dim, block_size)
        grad = torch.randn(q.shape, generator=torch.Generator(device).manual_seed(1), device=device).to(dtype)
        try:
            out = attend(q, k, v, layout, block_size)
            got = (out, *torch.autograd.grad(out, (q, k, v), grad))
        except Exception as e:
            return _one_line(e)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = reference_attention(q32, k32, v32, layout, block_size)
        want = (ref, *torch.autograd.grad(ref, (q32, k32, v32), grad.float()))
    for name, g, w in zip(("output", "dq", "dk", "dv"), got, want):
        error, bound = (g.float() - w).abs().max().item(), TOLERANCE[dtype] * max(w.abs().max().item(), 1.0)
        if not error <= bound:  # NaN fails too
            return f"its {name} differs from the reference by {error:.3g} (at most {bound:.3g} allowed)"
    return None


def verdict(q: torch.Tensor, block_size: int) -> str | None:
    """The Triton kernel's self-check for q's shape class, run on the first call and kept."""
    key = _shape_class(q, block_size)
    if key not in _verdicts:
        _verdicts[key] = disagreement(load_backend("triton"), q.device, q.dtype, q.shape[-1], block_size)
    return _verdicts[key]


def verified_triton(q, k, v, layout, block_size, scale=None) -> torch.Tensor:
    """``backend: triton`` on CUDA: the kernel once it passed its self-check; a failure stops the run."""
    problem = verdict(q, block_size)
    if problem is not None:
        raise InputError(f"the triton backend failed its check on {_where(q, block_size)}: {problem}; use backend flex or auto")
    return load_backend("triton")(q, k, v, layout, block_size, scale)


def triton_or_flex(q, k, v, layout, block_size, scale=None) -> torch.Tensor:
    """``backend: auto`` on CUDA: the Triton kernel once it passed its self-check, else FlexAttention, said once."""
    problem = verdict(q, block_size)
    if problem is None:
        return load_backend("triton")(q, k, v, layout, block_size, scale)
    if (key := _shape_class(q, block_size)) not in _fell_back:
        _fell_back.add(key)
        print(f"warning: the triton backend failed its check on {_where(q, block_size)}: {problem}; using flex instead",
              file=sys.stderr)  # fmt: skip
    return load_backend("flex")(q, k, v, layout, block_size, scale)


def _case(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int, layout: BlockLayout | None = None):
    """q, k, v ``[1, H, N, head_dim]``, requiring gradients, for ``layout``; by default 2 heads of 4 blocks, one
    with a sparse row."""
    if layout is None:
        grid = torch.ones(2, 4, 4, dtype=torch.bool).tril()
        grid[0, 2:, 0] = False
        layout = BlockLayout.from_dense(grid)
    g = torch.Generator(device).manual_seed(0)
    shape = (1, layout.n_heads, layout.n_blocks * block_size, head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_() for _ in range(3))
    return q, k, v, layout


def _shape_class(q: torch.Tensor, block_size: int) -> tuple:
    """What the kernel's correctness may depend on: device, dtype, head dim, block size."""
    return q.device, q.dtype, q.shape[-1], block_size


def _where(q: torch.Tensor, block_size: int) -> str:
    name = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else q.device.type
    return f"{q.device} ({name}) for {str(q.dtype).removeprefix('torch.')}, head dim {q.shape[-1]}, block size {block_size}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__
