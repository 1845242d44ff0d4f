"""The CPU pieces backend (PyTorch's fused flash kernel on unmasked pieces, merged by log-sum-exp) against the
fp32 oracle: output and dq, dk, dv, for every pattern and head mode, and for what makes pieces (windows wider
than the kernel's key split, chains of shared key sets, superrows, batches)."""

import oracle
import pytest
import torch
from oracle import PATTERNS, random_layout, single_block_rows

from sparse_transformer.model.kernels.pieces import _plan, pieces_attention
from sparse_transformer.model.patterns import AttentionPattern

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # of the reference's max |value|


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
    ],
    ids=["random", "single-block-rows", "dense", "one-block", "block-1"],
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


@pytest.mark.parametrize("name", ["strided-merged", "fixed-merged", "local-merged"])
def test_one_piece_per_call_is_exact(name, monkeypatch):
    """Calls bounded by CHUNK_BYTES (here: one superrow or gathered piece each, the most cut up) give the same
    result: the chunks of a window's backward and of a gather split only the batch of pieces."""
    monkeypatch.setattr("sparse_transformer.model.kernels.pieces.CHUNK_BYTES", 1)
    layout = PATTERNS[name].layout(2, 184)  # a length no other test plans, so the plan is made with the patch
    oracle.check_against_reference(pieces_attention, layout, 8, torch.float32, TOLERANCE[torch.float32])


def test_pieces_cover_every_tile_once():
    """Windows, chains and their superrows: every tile of the layout computed, none twice (by counting the
    tiles each piece's mask shows)."""
    for pattern, layer in [(p, layer) for p in PATTERNS.values() for layer in (0, 1)]:
        layout = pattern.layout(4, 256, layer)
        plan = _plan(layout, 1)
        covered = torch.zeros(layout.shape, dtype=torch.int)
        R = layout.n_blocks
        for w in plan.windows:
            for hh in range(w.heads):
                for c in range(w.count):
                    r0 = w.r0 + c * w.step
                    for i, row in enumerate(w.visible):
                        for j, seen in enumerate(row):
                            covered[w.h0 + hh * w.hstep, r0 + i, r0 + w.offset + j] += int(seen)
        for g in plan.gathers:
            for queries, keys in zip(g.queries.tolist(), g.keys.tolist()):
                for q, row in zip(queries, g.visible):
                    for k, seen in zip(keys, row):
                        covered[q // R, q % R, k % R] += int(seen)
        assert torch.equal(covered, layout.to_dense().int())


def test_rows_with_one_key_set_read_it_in_one_piece():
    """fixed's summary layer: the rows of a chunk (8 blocks at stride 64 in 8-blocks) read the same summaries, so
    each chunk is one gathered piece of its rows, however many more than CHAIN (its first row, whose summary
    lies right before it, reads that one in a window)."""
    layout = AttentionPattern("fixed", block_size=8, stride=64, summary=8, heads="interleaved").layout(2, 512, 1)
    pieces = {(g.rows, g.width) for g in _plan(layout, 1).gathers}
    assert pieces == {(8, k) for k in range(1, 7)} | {(7, 7)}


def test_a_column_chain_reads_its_rows_own_blocks():
    """strided's column layer (every 4th block back): four rows down a column read the union of their sets in one
    piece, each its own part, and three of them their own block there, so few single-block windows are left."""
    layout = PATTERNS["strided-interleaved"].layout(4, 256, 1)
    plan = _plan(layout, 1)
    shapes = {(g.rows, g.own) for g in plan.gathers}
    assert (4, (True, True, True, False)) in shapes
    single = sum(w.heads * w.count for w in plan.windows)
    assert single < layout.shape[0] * layout.shape[1] // 2

