"""What the backend tests share: hand-made layouts and the comparison with the fp32 oracle."""

from collections.abc import Callable

import torch

from sparse_transformer.model.kernels.reference import reference_attention
from sparse_transformer.model.layout import BlockLayout
from sparse_transformer.model.patterns import AttentionPattern

# Every sparse pattern in every head mode, at block 8: what each CPU backend is held to the reference on.
PATTERNS = {
    f"{kind}-{heads}": AttentionPattern(kind, block_size=8, stride=32, summary=8, heads=heads)
    for kind in ("strided", "fixed", "local")
    for heads in ("interleaved", "merged", "split")
}


def random_layout(n_heads: int, n_blocks: int, density: float, seed: int) -> BlockLayout:
    """A causal layout with the diagonal set and a random choice of the tiles below it."""
    g = torch.Generator().manual_seed(seed)
    layout = (torch.rand(n_heads, n_blocks, n_blocks, generator=g) < density).tril()
    return BlockLayout.from_dense(layout | torch.eye(n_blocks, dtype=torch.bool))


def single_block_rows(n_heads: int, n_blocks: int) -> BlockLayout:
    """Head 0 dense but for row 2, which only has its diagonal; every other head only the diagonal."""
    layout = torch.eye(n_blocks, dtype=torch.bool).repeat(n_heads, 1, 1)
    layout[0] = torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()
    layout[0, 2, :2] = False
    return BlockLayout.from_dense(layout)


def check_against_reference(
    attend: Callable[..., torch.Tensor],
    layout: BlockLayout | torch.Tensor,
    block_size: int,
    dtype: torch.dtype,
    tolerance: float,
    B: int = 2,
    D: int = 16,
    scale: float | None = None,
    device: str = "cpu",
) -> None:
    """Output and dq, dk, dv (random upstream grad) of ``attend`` within ``tolerance`` times the fp32
    oracle's largest value (at least 1)."""
    H, N = layout.shape[0], layout.shape[1] * block_size
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, N, D, device=device).to(dtype)
    out = attend(q, k, v, layout, block_size, scale)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q32, k32, v32, layout, block_size, scale)
    want = (ref, *torch.autograd.grad(ref, (q32, k32, v32), grad.float()))

    assert out.dtype == dtype and out.shape == q.shape
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (g.float() - w).abs().max().item()
        bound = tolerance * max(w.abs().max().item(), 1.0)
        assert err <= bound, f"{name}: max error {err:.2e} > {bound:.2e} ({dtype})"


def check_non_contiguous(
    attend: Callable[..., torch.Tensor], layout: BlockLayout | torch.Tensor, block_size: int, tolerance: float, device: str = "cpu"
) -> None:
    """Heads split out of a fused qkv, a transposed last dim and a transposed upstream grad, against the oracle."""
    B, D = 2, 16
    H, N = layout.shape[0], layout.shape[1] * block_size
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, device=device, requires_grad=True)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, H, N, D), strided
    v_t = torch.randn(B, H, D, N, device=device, requires_grad=True)
    v = v_t.transpose(-1, -2)  # (B, H, N, D), last dim strided
    grad = torch.randn(B, N, H, D, device=device).transpose(1, 2)
    out = attend(q, k, v, layout, block_size)
    got = (out, *torch.autograd.grad(out, (qkv, v_t), grad))
    ref = reference_attention(q, k, v, layout, block_size)
    want = (ref, *torch.autograd.grad(ref, (qkv, v_t), grad))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tolerance, rtol=tolerance)
