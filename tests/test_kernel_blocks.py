"""The pure-PyTorch block-sparse backend against the fp32 oracle: output and dq, dk, dv, on every kind of layout."""

import oracle
import pytest
import torch
from oracle import random_layout, single_block_rows

from sparse_transformer.model.kernels.blocks import blocks_attention
from sparse_transformer.model.kernels.reference import reference_attention
from sparse_transformer.model.layout import BlockLayout
from sparse_transformer.model.patterns import AttentionPattern

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # of the reference's max |value|


LAYOUTS = {
    "dense": lambda: AttentionPattern("dense", block_size=16).layout(4, 128),
    "local": lambda: AttentionPattern("local", block_size=16, stride=32).layout(4, 128),
    "strided": lambda: AttentionPattern("strided", block_size=16, stride=32).layout(4, 128),
    "strided_split": lambda: AttentionPattern("strided", block_size=16, stride=32, heads="split").layout(4, 128),
    "fixed_split": lambda: AttentionPattern("fixed", block_size=16, stride=64, summary=16, heads="split").layout(4, 128),
    "random": lambda: random_layout(4, 8, 0.4, seed=1),
    "single_block_rows": lambda: single_block_rows(4, 8),
}


def check_against_reference(layout: torch.Tensor, block_size: int, dtype: torch.dtype, **kwargs) -> None:
    oracle.check_against_reference(blocks_attention, layout, block_size, dtype, TOLERANCE[dtype], **kwargs)


@pytest.mark.parametrize("name", LAYOUTS)
def test_matches_reference_fp32(name: str) -> None:
    check_against_reference(LAYOUTS[name](), 16, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["dense", "strided_split", "random"])
def test_low_precision(name: str, dtype: torch.dtype) -> None:
    check_against_reference(LAYOUTS[name](), 16, dtype)


def test_block_32_head_dim_32_and_scale() -> None:
    layout = AttentionPattern("fixed", block_size=32, stride=64, summary=32, heads="split").layout(2, 256)
    check_against_reference(layout, 32, torch.float32, B=1, D=32, scale=0.3)


def test_one_block_sequence_and_element_blocks() -> None:
    check_against_reference(torch.ones(2, 1, 1, dtype=torch.bool), 16, torch.float32)
    check_against_reference(AttentionPattern("strided", block_size=1, stride=4).layout(2, 24), 1, torch.float32)


def test_non_contiguous_inputs() -> None:
    oracle.check_non_contiguous(blocks_attention, LAYOUTS["strided_split"](), 16, 1e-5)


def test_another_layout_gets_its_own_tables() -> None:
    """The lookup tables are cached per layout content; a layout that differs in one row must not reuse them."""
    layout = LAYOUTS["dense"]()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 128, 16) for _ in range(3))
    blocks_attention(q, k, v, layout, 16)
    grid = layout.to_dense()
    grid[:, 5, :3] = False
    layout = BlockLayout.from_dense(grid)
    torch.testing.assert_close(blocks_attention(q, k, v, layout, 16), reference_attention(q, k, v, layout, 16))


def test_memory_follows_the_tiles() -> None:
    """No tensor saved for backward is anywhere near N x N on a sparse layout: work follows the tiles."""
    N, bs = 2048, 16
    layout = AttentionPattern("local", block_size=bs, stride=32).layout(1, N)  # three tiles per row
    q, k, v = (torch.randn(1, 1, N, 16, requires_grad=True) for _ in range(3))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        blocks_attention(q, k, v, layout, bs).sum().backward()
    assert max(sizes) <= N * 3 * bs, f"largest saved tensor has {max(sizes)} elements; N x N is {N * N}"


def _inputs(shape=(1, 2, 32, 16), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


DENSE_2x2 = torch.ones(2, 2, 2, dtype=torch.bool).tril()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: dict(a, q=a["q"][0]), r"\[B, H, N, D\]"),
        (lambda a: dict(a, k=a["k"][:, :, :16]), r"share one \[B, H, N, D\] shape; got \[1, 2, 32, 16\], \[1, 2, 16"),
        (lambda a: dict(a, q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), r"dtype torch.int32 is not supported"),
        (lambda a: dict(a, v=a["v"].half()), r"dtypes differ"),
        (lambda a: dict(a, block_size=0), r"block_size=0 is not supported; use a positive int"),
        (lambda a: dict(a, block_size=32, **dict(zip("qkv", _inputs((1, 2, 48, 16))))), r"N=48 is not a multiple"),
        (lambda a: dict(a, layout=DENSE_2x2[:1]), r"layout shape \[1, 2, 2\] is not .* = \[2, 2, 2\]"),
        (lambda a: dict(a, layout=DENSE_2x2.int()), r"layout dtype torch.int32 is not supported; use torch.bool"),
        (lambda a: dict(a, layout=torch.ones(2, 2, 2, dtype=torch.bool)), r"not causal: head 0 has tile \(0, 1\)"),
        (lambda a: dict(a, layout=torch.tensor([[[1, 0], [1, 1]], [[1, 0], [1, 0]]], dtype=torch.bool)),
         r"head 1 query block 1 lacks its diagonal tile"),  # fmt: skip
    ],
    ids=["rank", "shape", "dtype", "dtype_mismatch", "block_size", "seq_len", "layout_shape", "layout_dtype",
         "not_causal", "missing_diagonal"],  # fmt: skip
)
def test_rejects(change, match: str) -> None:
    q, k, v = _inputs()
    args = change(dict(q=q, k=k, v=v, layout=DENSE_2x2, block_size=16))
    with pytest.raises(ValueError, match=match):
        blocks_attention(**args)
