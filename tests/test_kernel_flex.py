"""The FlexAttention backend against the fp32 oracle.

On CPU torch's FlexAttention runs eagerly, forward only, and reads nothing but ``mask_mod``; so the CPU tests
also expand the BlockMask as the compiled kernel reads it (full tiles unmasked, partial tiles through
``mask_mod``, the rest skipped) and compare that with the layout. The ``gpu`` tests check output and
dq, dk, dv of the compiled kernel on a CUDA device.
"""

import pytest
import torch
from oracle import random_layout, single_block_rows

from sparse_transformer.model.kernels.flex import _build_block_mask, flex_attention, flex_block_mask, flex_tile
from sparse_transformer.model.kernels.reference import reference_attention
from sparse_transformer.model.layout import BlockLayout, element_mask
from sparse_transformer.model.patterns import AttentionPattern

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # of the reference's max |value|


# (layout, block size): N = 256 with blocks of 16 or 32 is described with 128-wide tiles, N = 96 and
# blocks of 128 with tiles of the block size.
LAYOUTS = {
    "dense": lambda: (AttentionPattern("dense", block_size=16).layout(2, 256), 16),
    "local": lambda: (AttentionPattern("local", block_size=16, stride=32).layout(2, 256), 16),
    "strided_split": lambda: (AttentionPattern("strided", block_size=16, stride=32, heads="split").layout(4, 256), 16),
    "fixed_split": lambda: (AttentionPattern("fixed", block_size=32, stride=64, summary=32, heads="split").layout(4, 256), 32),
    "strided_n96": lambda: (AttentionPattern("strided", block_size=16, stride=32, heads="split").layout(2, 96), 16),
    "fixed_block128": lambda: (AttentionPattern("fixed", block_size=128, stride=256, summary=128).layout(2, 512), 128),
    "random": lambda: (random_layout(2, 16, 0.3, seed=1), 16),
    "single_block_rows": lambda: (single_block_rows(2, 8), 16),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_forward_matches_reference(name: str) -> None:
    layout, bs = LAYOUTS[name]()
    H, N = layout.shape[0], layout.shape[1] * bs
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, H, N, 16) for _ in range(3))
    want = reference_attention(q, k, v, layout, bs, scale=0.3)
    torch.testing.assert_close(flex_attention(q, k, v, layout, bs, scale=0.3), want, atol=1e-5, rtol=1e-5)


def _dense_tiles(num_blocks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Bool ``(H, C, C)`` from FlexAttention's (count, column list) form, batch 0."""
    num_blocks, indices = num_blocks[0], indices[0].long()  # (H, C), (H, C, C)
    C = indices.shape[-1]
    listed = torch.arange(C) < num_blocks[..., None]
    tiles = torch.zeros(*indices.shape[:-1], C + 1, dtype=torch.bool)
    return tiles.scatter(-1, torch.where(listed, indices, C), True)[..., :C]


@pytest.mark.parametrize("device_tiles", ["cpu", "cuda"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_block_mask_as_the_kernel_reads_it(name: str, device_tiles: str) -> None:
    """Full tiles are computed unmasked, so they must lie wholly in the layout and below the diagonal;
    with the partial tiles read through mask_mod the result must be exactly the layout made causal.
    The CPU's tiles are the layout's blocks; CUDA's may be coarser (``flex_tile``), built here on the CPU."""
    layout, bs = LAYOUTS[name]()
    H, N = layout.shape[0], layout.shape[1] * bs
    tile = flex_tile(bs, N) if device_tiles == "cuda" else bs
    cpu = torch.device("cpu")
    bm = flex_block_mask(layout, bs, cpu) if device_tiles == "cpu" else _build_block_mask(layout, bs, tile, cpu)
    assert bm.BLOCK_SIZE == (tile, tile) and bm.shape[-2:] == (N, N)

    def spread(tiles: torch.Tensor) -> torch.Tensor:  # (H, C, C) -> (H, N, N)
        return tiles.repeat_interleave(tile, 1).repeat_interleave(tile, 2)

    full = spread(_dense_tiles(bm.full_kv_num_blocks, bm.full_kv_indices))
    partial = spread(_dense_tiles(bm.kv_num_blocks, bm.kv_indices))
    assert not (full & partial).any()
    h, i, j = torch.arange(H)[:, None, None], torch.arange(N)[None, :, None], torch.arange(N)[None, None, :]
    kernel_mask = full | (partial & bm.mask_mod(0, h, i, j))
    torch.testing.assert_close(kernel_mask, element_mask(layout, bs))


def test_block_mask_is_cached_per_layout() -> None:
    layout, bs = LAYOUTS["dense"]()
    cpu = torch.device("cpu")
    assert flex_block_mask(layout, bs, cpu) is flex_block_mask(layout, bs, cpu)
    stale = flex_block_mask(layout, bs, cpu)
    grid = layout.to_dense()
    grid[:, 9, :4] = False  # another layout must not reuse the stale mask
    layout = BlockLayout.from_dense(grid)
    assert flex_block_mask(layout, bs, cpu) is not stale
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    torch.testing.assert_close(flex_attention(q, k, v, layout, bs), reference_attention(q, k, v, layout, bs))


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only limitation")
def test_refuses_backward_on_cpu() -> None:
    layout, bs = LAYOUTS["dense"]()
    q, k, v = (torch.randn(1, 2, 256, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(NotImplementedError, match="no backward on CPU.*'blocks' backend"):
        flex_attention(q, k, v, layout, bs)
    with torch.no_grad():
        flex_attention(q, k, v, layout, bs)


@pytest.mark.parametrize(
    "layout, match",
    [
        (torch.ones(2, 2, 2, dtype=torch.bool), r"not causal: head 0 has tile \(0, 1\)"),
        (torch.ones(2, 3, 3, dtype=torch.bool).tril(), r"layout shape \[2, 3, 3\] is not .* = \[2, 2, 2\]"),
    ],
    ids=["not_causal", "layout_shape"],
)
def test_rejects(layout: torch.Tensor, match: str) -> None:
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        flex_attention(q, k, v, layout, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["dense", "strided_split", "fixed_split", "fixed_block128", "random"])
def test_gpu_forward_and_gradients(name: str, dtype: torch.dtype) -> None:
    layout, bs = LAYOUTS[name]()
    H, N = layout.shape[0], layout.shape[1] * bs
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, H, N, 64, device=DEVICE).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(2, H, N, 64, device=DEVICE).to(dtype)
    out = flex_attention(q, k, v, layout, bs)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q32, k32, v32, layout, bs)
    want = (ref, *torch.autograd.grad(ref, (q32, k32, v32), grad.float()))
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (g.float() - w).abs().max().item()
        bound = TOLERANCE[dtype] * max(w.abs().max().item(), 1.0)
        assert err <= bound, f"{label}: max error {err:.2e} > {bound:.2e} ({dtype})"
