"""The C++ CPU kernel against the fp32 oracle: output and dq, dk, dv, for every pattern and head mode, for what makes
its tiles (rows grouped when blocks are small, keys in chunks of 512, runs of adjacent blocks), in fp32 and bf16;
and a clean fall back to pieces where it cannot be built (its build: test_kernel_build.py)."""

import warnings

import oracle
import pytest
import torch
from oracle import PATTERNS, random_layout, single_block_rows

from sparse_transformer.model.kernels import build, get_backend
from sparse_transformer.model.kernels.cpp import _tiles, cpp_attention, cpp_attention_qkv
from sparse_transformer.model.kernels.reference import reference_attention
from sparse_transformer.model.kernels.pieces import pieces_attention
from sparse_transformer.model.patterns import AttentionPattern

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # of the reference's max |value|


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", PATTERNS)
def test_every_pattern_and_head_mode_matches_the_reference(name, layer):
    layout = PATTERNS[name].layout(4, 128, layer)
    oracle.check_against_reference(cpp_attention, layout, 8, torch.float32, TOLERANCE[torch.float32])


@pytest.mark.parametrize(
    "layout,block_size",
    [
        (random_layout(3, 10, 0.4, seed=1), 8),
        (random_layout(2, 9, 0.5, seed=2), 16),  # an odd number of blocks: a head's last tile is short
        (single_block_rows(2, 8), 8),
        (AttentionPattern("dense", block_size=8).layout(2, 64), 8),  # SDPA's causal kernel
        (torch.ones(2, 1, 1, dtype=torch.bool), 16),  # one block
        (AttentionPattern("strided", block_size=1, stride=4).layout(2, 24), 1),  # element-level blocks, 16 to a tile
        (AttentionPattern("strided", block_size=8, stride=24, heads="split").layout(2, 200), 8),  # 25 rows, step 3
    ],
    ids=["random", "short-last-tile", "single-block-rows", "dense", "one-block", "block-1", "step-not-dividing"],
)
def test_unusual_layouts(layout, block_size):
    oracle.check_against_reference(cpp_attention, layout, block_size, torch.float32, 1e-5)


@pytest.mark.parametrize("kind", ["local", "strided", "fixed"])
def test_rows_longer_than_a_chunk(kind):
    """64-blocks and windows of 1,024 keys: a row's keys in several chunks of 512, the running softmax carried
    across them, and runs of adjacent blocks cut at a chunk's end."""
    layout = AttentionPattern(kind, block_size=64, stride=1024, summary=32).layout(2, 2048)
    oracle.check_against_reference(cpp_attention, layout, 64, torch.float32, 2e-5, B=1, D=16)


def test_bf16_batches_scale_and_non_contiguous_inputs():
    layout = PATTERNS["fixed-split"].layout(4, 128)
    oracle.check_against_reference(cpp_attention, layout, 8, torch.bfloat16, TOLERANCE[torch.bfloat16], B=3)
    oracle.check_against_reference(cpp_attention, layout, 8, torch.float32, 1e-5, B=2, scale=0.3)
    oracle.check_non_contiguous(cpp_attention, layout, 8, 1e-5)


def test_a_tile_groups_small_blocks_and_reads_the_union_of_their_keys():
    """Blocks of 8: four consecutive query blocks to a tile; each key block of the union carries a bit for each
    query block that reads it, and every tile of the layout is read exactly once."""
    layout = PATTERNS["strided-merged"].layout(2, 256)
    tiles = _tiles(layout, 8)
    H, R, _ = layout.shape
    assert tiles.rows_ptr.diff().tolist() == [4] * (H * R // 4)
    covered = torch.zeros(H * R, H * R, dtype=torch.int)
    for t in range(len(tiles.rows_ptr) - 1):
        rows = tiles.rows[tiles.rows_ptr[t] : tiles.rows_ptr[t + 1]].tolist()
        for key, bits in zip(*(x[tiles.keys_ptr[t] : tiles.keys_ptr[t + 1]].tolist() for x in (tiles.keys, tiles.seen))):
            for i, row in enumerate(rows):
                covered[row, key] += (bits >> i) & 1
    want = torch.block_diag(*layout.to_dense().int())
    assert torch.equal(covered, want)
    assert tiles.head_ptr.tolist() == [0, R // 4, 2 * R // 4]
    assert torch.equal(tiles.order.sort().values, torch.arange(len(tiles.order), dtype=torch.int32))


def test_column_rows_are_visited_by_residue():
    """strided's column rule (row r reads r, r - 4, r - 8, ...): a head's rows go r, r + 4, r + 8, ..., so the next
    row reads what the last one did and one block more; the row rule's heads keep their order."""
    layout = AttentionPattern("strided", block_size=32, stride=128, heads="split").layout(2, 1024)  # head 1: columns
    tiles = _tiles(layout, 32)
    rows = tiles.rows[tiles.order.long()].tolist()  # one block a tile
    R = 32
    assert rows[:R] == list(range(R))
    assert rows[R:] == [R + r for residue in range(4) for r in range(residue, R, 4)]


def test_auto_is_cpp_on_the_cpu():
    assert get_backend("auto", torch.device("cpu")) is cpp_attention


def test_refuses_a_cuda_or_meta_tensor():
    q = torch.zeros(1, 1, 8, 4, device="meta")
    with pytest.raises(ValueError, match="the cpp backend runs on the CPU; q is on meta"):
        cpp_attention(q, q, q, torch.ones(1, 1, 1, dtype=torch.bool), 8)


def test_no_compiler_falls_back_to_pieces(monkeypatch, tmp_path, request):
    """Where the kernel cannot be built, auto warns once, however often it is asked, and takes pieces; asking for
    cpp by name says why."""
    build.load.cache_clear()  # forget this process's load, so the failing build is seen; and after, the failure
    request.addfinalizer(build.load.cache_clear)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("SPARSE_TRANSFORMER_CACHE", str(tmp_path))
    q = torch.zeros(1, 1, 8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Python's own once-per-place filter would hide a second warning
        assert get_backend("auto", torch.device("cpu")) is pieces_attention
        assert get_backend("auto", torch.device("cpu")) is pieces_attention
        with pytest.raises(RuntimeError, match="could not be built here"):
            cpp_attention(q, q, q, torch.ones(1, 1, 1, dtype=torch.bool), 8)
    said = [str(w.message) for w in caught if "C++ CPU attention kernel is unavailable" in str(w.message)]
    assert said == [
        "the C++ CPU attention kernel is unavailable (no C++ compiler found (/nonexistent/c++; set CXX, or install g++)); "
        "using the pieces backend"
    ]


@pytest.mark.parametrize("name", ["strided-split", "fixed-merged", "local-interleaved"])
def test_a_fused_projection_output_is_attended_where_it_lies(name):
    """``cpp_attention_qkv``: the heads read from a (B, N, 3, H, D) tensor, output (B, N, H, D) and one (B, N, 3, H, D)
    gradient, equal to the oracle's; what it keeps for the backward is that tensor itself, not a copy."""
    torch.manual_seed(0)
    B, N, H, D = 2, 128, 4, 16
    layout = PATTERNS[name].layout(H, N)
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = cpp_attention_qkv(qkv, layout, 8)
    grad = torch.randn(B, N, H, D)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    ref = reference_attention(q, k, v, layout, 8).transpose(1, 2)
    (want,) = torch.autograd.grad(ref, qkv, grad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dqkv, want, atol=1e-5, rtol=1e-5)
    assert out.shape == (B, N, H, D) and out.is_contiguous() and dqkv.is_contiguous()
    assert any(t.data_ptr() == qkv.data_ptr() for t in saved)
    assert sum(t.numel() for t in saved) < 1.2 * (qkv.numel() + out.numel())  # qkv, the output and its log-sum-exp


def test_the_attention_module_gives_the_same_with_the_fused_path():
    """SparseAttention on cpp (fused path) and on pieces (q, k, v split out and merged back): the same output and
    gradients for the same weights."""
    from sparse_transformer.model import ModelConfig, Sparse
    from sparse_transformer.model.attention.sparse import SparseAttention

    torch.manual_seed(0)
    pattern = PATTERNS["fixed-split"]
    modules = [SparseAttention(ModelConfig(d_model=32, n_heads=4, pattern=pattern, attention=Sparse(b)), 128, 0) for b in ("cpp", "pieces")]
    modules[1].load_state_dict(modules[0].state_dict())
    x = torch.randn(2, 128, 32)
    outs = [m(x) for m in modules]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(o.square().sum(), list(m.parameters())) for o, m in zip(outs, modules)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
