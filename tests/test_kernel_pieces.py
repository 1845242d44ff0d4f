"""The CPU pieces backend (PyTorch's fused flash kernel on unmasked pieces, merged by log-sum-exp) against the
fp32 oracle: output and dq, dk, dv, for every pattern and head mode, and for what makes pieces (windows wider
than the kernel's key split, chains of shared key sets, superrows, batches)."""

import oracle
import pytest
import torch
from oracle import random_layout, single_block_rows

from sparse_transformer.model.kernels import get_backend
from sparse_transformer.model.kernels.pieces import _plan, pieces_attention
from sparse_transformer.model.patterns import AttentionPattern

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # of the reference's max |value|
PATTERNS = {
    f"{kind}-{heads}": AttentionPattern(kind, block_size=8, stride=32, summary=8, heads=heads)
    for kind in ("strided", "fixed", "local")
    for heads in ("interleaved", "merged", "split")
}


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", PATTERNS)
def test_every_pattern_and_head_mode_matches_the_reference(name, layer):
    layout = PATTERNS[name].layout(4, 128, layer)
    oracle.check_against_reference(pieces_attention, layout, 8, torch.float32, TOLERANCE[torch.float32])


@pytest.mark.parametrize(
    "layout,block_size",
    [
        (random_layout(3, 10, 0.4, seed=1), 8),
        (single_block_rows(2, 8), 8),
        (AttentionPattern("dense", block_size=8).layout(2, 64), 8),  # one causal call
        (torch.ones(2, 1, 1, dtype=torch.bool), 16),  # one block
        (AttentionPattern("strided", block_size=1, stride=4).layout(2, 24), 1),  # element-level sets
        (AttentionPattern("strided", block_size=8, stride=24, heads="split").layout(4, 128), 8),  # 16 rows, classes of 3
    ],
    ids=["random", "single-block-rows", "dense", "one-block", "block-1", "padded-columns"],
)
def test_unusual_layouts(layout, block_size):
    oracle.check_against_reference(pieces_attention, layout, block_size, torch.float32, 1e-5)


def test_bf16_batches_scale_and_non_contiguous_inputs():
    layout = PATTERNS["fixed-split"].layout(4, 128)
    oracle.check_against_reference(pieces_attention, layout, 8, torch.bfloat16, TOLERANCE[torch.bfloat16], B=3)
    oracle.check_against_reference(pieces_attention, layout, 8, torch.float32, 1e-5, B=2, scale=0.3)
    oracle.check_non_contiguous(pieces_attention, layout, 8, 1e-5)


@pytest.mark.parametrize("kind", ["local", "strided", "fixed"])
def test_windows_wider_than_the_kernels_key_split(kind):
    """64-blocks and windows of 1,024 keys: kernel key splits that a row's mask hides entirely stay exact."""
    layout = AttentionPattern(kind, block_size=64, stride=1024, summary=32).layout(2, 2048)
    oracle.check_against_reference(pieces_attention, layout, 64, torch.float32, 2e-5, B=1, D=16)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", PATTERNS)
def test_pieces_cover_every_tile_once(name, layer):
    """Columns, windows, chains and their superrows: every tile of the layout computed, none twice (by counting)."""
    layout = PATTERNS[name].layout(4, 256, layer)
    plan = _plan(layout, 1)
    covered = torch.zeros_like(layout, dtype=torch.int)
    R = layout.shape[1]
    for c in plan.causal:
        for h in c.heads:
            for r in range(R):
                blocks = range(r, -1, -c.period) if c.classes else range(r - r % c.period, r + 1)
                for block in blocks:
                    covered[h, r, block] += 1
    for w in plan.windows:
        for hh in range(w.heads):
            for c in range(w.count):
                r0 = w.r0 + c * w.step
                for i, row in enumerate(w.visible):
                    for j, seen in enumerate(row):
                        covered[w.h0 + hh * w.hstep, r0 + i, r0 + w.offset + j] += int(seen)
    for g in plan.gathers:
        for queries, keys in zip(g.queries.tolist(), g.keys.tolist()):
            for q in queries:
                for k in keys:
                    covered[q // R, q % R, k % R] += 1
    assert torch.equal(covered, layout.int())


def test_columns_and_chunks_are_causal_calls():
    """strided's columns (every 4th block back, at stride 32 in 8-blocks) in all heads of merged and of the
    column layer, in half the heads of split; fixed's own chunks of 4 blocks likewise; local has neither."""
    cases = [
        ("strided-merged", 0, True, (0, 1, 2, 3)),
        ("strided-interleaved", 1, True, (0, 1, 2, 3)),
        ("strided-split", 0, True, (1, 3)),
        ("fixed-merged", 0, False, (0, 1, 2, 3)),
        ("fixed-interleaved", 0, False, (0, 1, 2, 3)),
        ("fixed-split", 0, False, (0, 2)),
    ]
    for name, layer, classes, heads in cases:
        (causal,) = _plan(PATTERNS[name].layout(4, 256, layer), 1).causal
        assert (causal.period, causal.classes, sorted(causal.heads)) == (4, classes, list(heads))
    only_columns = _plan(PATTERNS["strided-interleaved"].layout(4, 256, 1), 1)
    assert not only_columns.windows and not only_columns.gathers
    fixed = _plan(PATTERNS["fixed-merged"].layout(4, 256), 1)  # chunks, then one piece of summaries per chunk
    assert not fixed.windows and {(g.rows, g.width) for g in fixed.gathers} == {(4, k) for k in range(1, 8)}
    for name in ("local-merged", "local-interleaved"):
        assert not _plan(PATTERNS[name].layout(4, 256, 1), 1).causal


def test_auto_is_pieces_on_the_cpu():
    assert get_backend("auto", torch.device("cpu")) is pieces_attention
