"""The per-layout caches (``lut.per_layout``): plans are built once per layout content, however deep the model,
never rebuilt per call; entries of layouts no longer alive are dropped, so the caches stay the size of the models."""

import pytest
import torch

from sparse_transformer.model import AttentionPattern, ModelConfig
from sparse_transformer.model.attention.sparse import Sparse
from sparse_transformer.model.kernels import cpp, lut, pieces
from sparse_transformer.model.layout import BlockLayout
from sparse_transformer.training.lightning_module import SparseTransformerLM

PATTERN = AttentionPattern("strided", block_size=8, stride=16, heads="interleaved")


@pytest.mark.parametrize("backend, plans", [("cpp", cpp._tiles), ("pieces", pieces._plan)])
def test_a_128_layer_model_builds_each_plan_once(backend, plans, one_thread):
    """128 layers, two rules between them: two plans, built on the first step; the later steps, forward and
    backward, build none."""
    module = SparseTransformerLM(ModelConfig(seq_len=32, d_model=16, n_layers=128, n_heads=2, pattern=PATTERN, attention=Sparse(backend)))
    batch = torch.randint(0, 256, (2, 33))
    plans.cache_clear()
    before = plans.builds
    for step in range(3):
        module._loss(batch).backward()
        if step == 0:
            first = plans.builds - before
    assert first == 2
    assert plans.builds - before == 2


def test_layouts_all_different_are_each_built_once():
    """More distinct layouts than any fixed bound (here 200 random ones, all alive): each built once, then hits."""
    grids = [torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(i)).lt(0.5).tril() | torch.eye(6, dtype=torch.bool) for i in range(200)]
    layouts = [BlockLayout.from_dense(g) for g in grids]
    built = lut.per_layout(lambda layout: layout.nnz)
    for _ in range(3):
        for layout in layouts:
            built(layout)
    assert built.builds == len({tuple(g.flatten().tolist()) for g in grids})


def test_entries_of_dead_layouts_are_dropped_beyond_the_spare_ones():
    built = lut.per_layout(lambda layout: torch.zeros(1000))
    keep = [AttentionPattern("local", block_size=8, stride=8 * s).layout(2, 256) for s in range(1, 4)]
    for s in range(4, 40):  # layouts made and dropped (by reference counting), one per call
        built(AttentionPattern("local", block_size=8, stride=8 * s).layout(2, 256))
    for layout in keep:
        built(layout)
    assert len(built.entries) <= built.spare + len(keep)
    before = built.builds
    for layout in keep:
        built(layout)
    assert built.builds == before


def test_another_layout_with_the_same_content_hits_and_other_content_misses():
    built = lut.per_layout(lambda layout: object())
    first = built(PATTERN.layout(2, 64))
    grid = PATTERN.layout(2, 64).to_dense()
    assert built(BlockLayout.from_dense(grid)) is first  # same content, another object
    grid[:, 5, 0] = ~grid[:, 5, 0]
    assert built(BlockLayout.from_dense(grid)) is not first


def test_cache_bytes_counts_the_masks_of_pieces_plans():
    layout = AttentionPattern("strided", block_size=16, stride=64).layout(2, 512)
    q = torch.randn(1, 2, 512, 16)
    pieces._plan.cache_clear()
    before = lut.cache_bytes()
    pieces.pieces_attention(q, q, q, layout, 16)
    plan = next(iter(pieces._plan.entries.values()))
    masks = sum(m.nbytes for m in plan.masks.values())
    assert masks > 0 and lut.cache_bytes() - before >= masks
