"""Patterns against brute-force constructions from the set definitions of Child et al. (2019), section 4."""

import itertools

import pytest
import torch

from sparse_transformer.model.layout import element_mask
from sparse_transformer.model.patterns import AttentionPattern, PatternError


def brute_rules(kind: str, n: int, l: int, c: int) -> list[set[tuple[int, int]]]:
    """The sets A(1), A(2) of the paper as (i, j) pairs, by enumeration."""
    pairs = [(i, j) for i in range(n) for j in range(i + 1)]
    if kind == "dense":
        return [set(pairs)]
    if kind == "local":
        return [{(i, j) for i, j in pairs if i - l <= j}]
    if kind == "strided":
        return [{(i, j) for i, j in pairs if i - l <= j}, {(i, j) for i, j in pairs if (i - j) % l == 0}]
    return [
        {(i, j) for i, j in pairs if j // l == i // l},
        {(i, j) for i, j in pairs if j % l in range(l - c, l) or j == i},  # plus itself, see patterns.py
    ]


def to_mask(pairs: set[tuple[int, int]], n: int) -> torch.Tensor:
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, j in pairs:
        m[i, j] = True
    return m


def block_cover(mask: torch.Tensor, bs: int) -> torch.Tensor:
    n = mask.shape[-1] // bs
    return mask.reshape(n, bs, n, bs).any(3).any(1)


CASES = [
    # (kind, n, l, c, block)
    ("dense", 32, 8, 2, 4),
    ("local", 48, 8, 2, 4),
    ("local", 32, 4, 1, 1),
    ("strided", 64, 8, 2, 4),
    ("strided", 48, 12, 2, 3),
    ("strided", 32, 4, 1, 1),
    ("fixed", 64, 16, 4, 4),
    ("fixed", 64, 16, 3, 8),
    ("fixed", 48, 12, 12, 6),
    ("fixed", 32, 8, 1, 1),
]


@pytest.mark.parametrize("kind,n,l,c,bs", CASES)
@pytest.mark.parametrize("heads", ["merged", "interleaved", "split"])
def test_pattern_matches_set_definitions(kind, n, l, c, bs, heads):
    pattern = AttentionPattern(kind=kind, block_size=bs, stride=l, summary=c, heads=heads)
    rules = [to_mask(r, n) for r in brute_rules(kind, n, l, c)]
    n_heads = 3
    for layer in range(2):
        if len(rules) == 1 or heads == "merged":
            expected = [rules[0] if len(rules) == 1 else rules[0] | rules[1]] * n_heads
        elif heads == "interleaved":
            expected = [rules[layer % 2]] * n_heads
        else:
            expected = [rules[h % 2] for h in range(n_heads)]
        expected = torch.stack(expected)
        assert torch.equal(pattern.mask(n_heads, n, layer), expected)
        expected_layout = torch.stack([block_cover(m, bs) for m in expected])
        assert torch.equal(pattern.layout(n_heads, n, layer).to_dense(), expected_layout)


@pytest.mark.parametrize("kind,n,l,c,bs", CASES)
def test_layouts_are_causal_and_see_themselves(kind, n, l, c, bs):
    for heads in ("merged", "interleaved", "split"):
        layout = AttentionPattern(kind, bs, l, c, heads).layout(4, n, layer=1).to_dense()
        assert not layout.triu(1).any(), "a tile above the diagonal"
        assert layout.diagonal(dim1=1, dim2=2).all(), "a query block that does not see itself"
        mask = element_mask(layout, bs)
        assert mask.diagonal(dim1=1, dim2=2).all() and not mask.triu(1).any()


def test_block_size_one_layout_is_the_exact_mask():
    p = AttentionPattern("fixed", block_size=1, stride=8, summary=3)
    assert torch.equal(p.layout(2, 40).to_dense(), p.mask(2, 40))


def test_sparse_layouts_are_sparse():
    n = 4096
    dense = AttentionPattern("dense", block_size=64).layout(1, n)
    strided = AttentionPattern("strided", block_size=64, stride=512).layout(1, n)
    fixed = AttentionPattern("fixed", block_size=64, stride=512, summary=64).layout(1, n)
    assert dense.density() == 1.0 and dense.is_dense
    assert strided.density() < 0.35 and fixed.density() < 0.35


def test_patterns_depend_only_on_absolute_position():
    """A shorter sequence uses the top-left corner of the full layout (what the model relies on)."""
    p = AttentionPattern("strided", block_size=4, stride=8, heads="split")
    assert torch.equal(p.layout(2, 64).crop(5).to_dense(), p.layout(2, 20).to_dense())


@pytest.mark.parametrize(
    "kwargs,seq_len,message",
    [
        (dict(kind="strided", block_size=16, stride=24), None, "stride=24 must be a positive multiple of block_size=16"),
        (dict(kind="fixed", block_size=8, stride=16, summary=17), None, "summary=17 must be in 1..stride=16"),
        (dict(kind="fixed", block_size=8, stride=16, summary=0), None, "summary=0 must be in 1..stride=16"),
        (dict(kind="banded"), None, "pattern kind 'banded' is not one of"),
        (dict(heads="mixed"), None, "pattern heads 'mixed' is not one of"),
        (dict(kind="dense", block_size=16), 100, "sequence length 100 is not a positive multiple of block_size=16"),
    ],
)
def test_invalid_parameters_are_refused(kwargs, seq_len, message):
    with pytest.raises(PatternError, match=message):
        AttentionPattern(**kwargs).layout(2, seq_len or 64)


def test_strided_row_column_for_images():
    """With stride = row width, A(1) reaches the previous row and A(2) the same column (section 4.2)."""
    width = 8
    mask = AttentionPattern("strided", block_size=1, stride=width, heads="split").mask(2, width * width)
    i = 5 * width + 3
    row = {j for j in range(width * width) if mask[0, i, j]}
    col = {j for j in range(width * width) if mask[1, i, j]}
    assert row == set(range(i - width, i + 1))
    assert col == {r * width + 3 for r in range(6)}
    assert all(mask[h].sum() > 0 for h, _ in itertools.product(range(2), [0]))
