"""BlockLayout, the compressed rows every backend reads: the same tiles as a grid, its views (a shorter sequence's
corner, a window of rows), what it refuses, and what a layout of 2^20 positions costs to build."""

import json
import subprocess
import sys

import pytest
import torch
from commands import ROOT
from oracle import random_layout

from sparse_transformer.model.layout import BlockLayout, LayoutError, element_mask
from sparse_transformer.model.patterns import AttentionPattern


def test_rows_and_grid_are_the_same_tiles():
    grid = random_layout(3, 11, 0.4, seed=3).to_dense()
    layout = BlockLayout.from_dense(grid)
    assert torch.equal(layout.to_dense(), grid)
    assert layout.nnz == int(grid.sum()) and torch.equal(layout.counts(), grid.sum(-1))
    assert layout.density() == pytest.approx(int(grid.sum()) / (3 * 11 * 12 / 2))
    for h, r in [(0, 0), (1, 5), (2, 10)]:
        assert layout.row(h, r).tolist() == grid[h, r].nonzero().flatten().tolist()  # ascending, the diagonal last


def test_dense_stores_no_rows_until_asked():
    layout = BlockLayout.causal(4, 1 << 14)  # 2^20 positions in blocks of 64: 2^27 tiles a head, none stored
    assert layout.is_dense and layout.density() == 1.0 and layout._indices is None
    assert layout.row(2, 5).tolist() == list(range(6))
    small = BlockLayout.causal(2, 5)
    assert torch.equal(small.to_dense(), torch.ones(2, 5, 5, dtype=torch.bool).tril())
    assert BlockLayout.from_dense(small.to_dense()).is_dense  # a full grid is recognised as dense


def test_crop_is_the_top_left_corner_and_one_object_per_length():
    layout = AttentionPattern("fixed", block_size=4, stride=16, summary=4, heads="split").layout(2, 128)
    assert torch.equal(layout.crop(13).to_dense(), layout.to_dense()[:, :13, :13])
    assert layout.crop(13) is layout.crop(13) and layout.crop(32) is layout
    with pytest.raises(LayoutError, match="a crop of 33 blocks is outside this layout's 1..32"):
        layout.crop(33)


@pytest.mark.parametrize("rows, cols", [(range(0, 32), range(0, 32)), (range(7, 19), range(3, 19)), (range(30, 32), range(0, 2))])
def test_a_window_of_rows_and_columns(rows, cols):
    layout = AttentionPattern("strided", block_size=2, stride=8, heads="split").layout(3, 64)
    want = layout.to_dense()[:, rows.start : rows.stop, cols.start : cols.stop]
    assert torch.equal(layout.grid(rows, cols), want)
    assert torch.equal(BlockLayout.causal(3, 32).grid(rows, cols), torch.ones(3, 32, 32, dtype=torch.bool).tril()[:, rows][:, :, cols])


def test_element_mask_takes_either_form():
    layout = random_layout(2, 4, 0.5, seed=1)
    assert torch.equal(element_mask(layout, 3), element_mask(layout.to_dense(), 3))


@pytest.mark.parametrize(
    "indptr, indices, message",
    [
        ([0, 1, 3], [0, 1, 0], r"head 0 query block 1 lacks its diagonal tile"),  # row 1 ends on 0
        ([0, 1, 3], [0, 0, 2], r"not causal: head 0 has tile \(1, 2\) above the diagonal"),
        ([0, 1, 1], [0], r"head 0 query block 1 lacks its diagonal tile"),  # an empty row
        ([0, 1, 4], [0, 1, 0, 1], r"rows must list key blocks once each, ascending"),  # 1 before 0 within a row
        ([0, 2], [0], r"indptr of shape \[2\] is not the row pointers of 1 x 2 rows"),
    ],
)
def test_a_malformed_layout_is_refused_in_one_line(indptr, indices, message):
    with pytest.raises(LayoutError, match=message):
        BlockLayout(1, 2, torch.tensor(indptr), torch.tensor(indices))


def test_a_grid_that_is_not_a_causal_layout_is_refused():
    with pytest.raises(LayoutError, match="layout dtype torch.int64 is not supported"):
        BlockLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.long))
    with pytest.raises(LayoutError, match=r"not causal: head 0 has tile \(0, 1\)"):
        BlockLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.bool))


def test_equal_layouts_share_a_digest():
    grid = random_layout(2, 9, 0.3, seed=7).to_dense()
    a, b = BlockLayout.from_dense(grid), BlockLayout.from_dense(grid.clone())
    assert a is not b and a.digest == b.digest
    grid[1, 8, 0] = ~grid[1, 8, 0]
    assert BlockLayout.from_dense(grid).digest != a.digest


BUILD_2_20 = """
import json, sys
sys.path.insert(0, sys.argv[3])
from bench.rss import peak_rss
from sparse_transformer.model.patterns import AttentionPattern
kind, heads = sys.argv[1], sys.argv[2]
before = peak_rss()
layout = AttentionPattern(kind, block_size=64, stride=8192, summary=32, heads=heads).layout(4, 2**20)
held = 0 if layout.is_dense else layout.indptr.nbytes + layout.indices.nbytes
peak = peak_rss() - before
print(json.dumps({"held": held, "peak": peak, "density": layout.density()}))
"""


@pytest.mark.parametrize("kind, heads", [("dense", "merged"), ("local", "merged"), ("strided", "merged"), ("fixed", "merged"), ("fixed", "split")])
def test_layouts_of_a_million_positions_take_seconds_and_tens_of_mb(kind, heads):
    """N = 2^20 in blocks of 64, 4 heads: a grid would be 2^30 tiles (1 GiB a layout, and 24 bytes a tile to build).
    The rows hold tens of MB, and building them peaks at a few hundred: O(tiles), in its own process to measure it
    (int64 copies of every tile had taken it to 570-640 MB, 5 % under the bound to 7 % over it).
    Merged heads are each kind's largest layout. (Seconds to build: bench/long.py.)"""
    done = subprocess.run([sys.executable, "-c", BUILD_2_20, kind, heads, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    built = json.loads(done.stdout)
    assert built["held"] < 80 * 2**20, built  # strided merged, the largest: 48 MB
    assert built["peak"] < 400 * 2**20, built  # strided merged: 230-270 MB; a grid of bools alone would be 1 GiB
