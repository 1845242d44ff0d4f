"""The all-attention layer: persistent memory through every backend equals one dense softmax over
[memory; allowed context]; the block without its feed-forward sublayer has the expected parameters and trains."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_transformer.errors import InputError
from sparse_transformer.model import AttentionPattern, Block, HourglassConfig, ModelConfig, Sparse, SparseTransformer
from sparse_transformer.model.attention.persistent_memory import PersistentMemory, memory_layout
from sparse_transformer.model.kernels import get_backend
from sparse_transformer.model.layout import element_mask


def memory_of(pattern: AttentionPattern, heads: int, head_dim: int, size: int, layout) -> PersistentMemory:
    config = ModelConfig(d_model=heads * head_dim, n_heads=heads, pattern=pattern, attention=Sparse(persistent_memory=size))
    return PersistentMemory(config, layout)

PATTERNS = [
    AttentionPattern("dense", block_size=8),
    AttentionPattern("strided", block_size=8, stride=16, heads="split"),
    AttentionPattern("fixed", block_size=8, stride=16, summary=8, heads="merged"),
    AttentionPattern("local", block_size=4, stride=8),
]


def dense_with_memory(q, k, v, mem_k, mem_v, mask):
    """softmax([q mem_k^T, masked q k^T] / sqrt(D)) [mem_v; v], written out directly. mask (H, N, N)."""
    scale = 1 / math.sqrt(q.shape[-1])
    ctx = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))  # (B, H, N, N)
    mem = q @ mem_k.transpose(-1, -2) * scale  # (B, H, N, M)
    probs = torch.softmax(torch.cat([mem, ctx], dim=-1), dim=-1)
    return probs @ torch.cat([mem_v.expand(q.shape[0], -1, -1, -1), v], dim=2)


def test_memory_layout_is_a_valid_causal_layout_with_the_old_one_in_the_corner():
    layout = AttentionPattern("strided", block_size=4, stride=8, heads="split").layout(2, 32)
    ext = memory_layout(layout, 2)  # a BlockLayout: causal, every diagonal tile set, checked as it is made
    assert ext.shape == (2, 10, 10)
    grid = ext.to_dense()
    assert torch.equal(grid[:, 2:, 2:], layout.to_dense())
    assert grid[:, 2:, :2].all() and not grid[:, :2, 2:].any()
    assert torch.equal(grid[:, :2, :2], torch.ones(2, 2, 2, dtype=torch.bool).tril())


CASES = [(p, backend, 32) for p in PATTERNS for backend in ("reference", "blocks", "cpp", "pieces")]
CASES += [(PATTERNS[1], "blocks", 16)]  # a shorter sequence: the top-left corner of the memory layout
# The Triton kernel (interpreted on CPU) takes blocks of 16 or more.
CASES += [(AttentionPattern("fixed", block_size=16, stride=32, summary=16, heads="split"), "triton", 64)]


@pytest.mark.parametrize(
    "pattern,backend,n", CASES, ids=lambda c: f"{c.kind}-bs{c.block_size}" if isinstance(c, AttentionPattern) else str(c)
)
def test_memory_joins_the_same_softmax_as_the_context(pattern, backend, n):
    torch.manual_seed(0)
    H, D, M = 2, 16, 2 * pattern.block_size
    layout = pattern.layout(H, max(n, 32))
    memory = memory_of(pattern, H, D, M, layout)
    q, k, v = (torch.randn(2, H, n, D, requires_grad=True) for _ in range(3))
    out = memory.attend(get_backend(backend, q.device), q, k, v)
    mask = element_mask(layout.crop(n // pattern.block_size), pattern.block_size)
    expected = dense_with_memory(q, k, v, memory.keys * math.sqrt(D), memory.values * math.sqrt(M), mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Gradients too, memory included: the zero query rows and their dropped outputs leak nothing back.
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, memory.keys, memory.values), g)
    want = torch.autograd.grad(expected, (q, k, v, memory.keys, memory.values), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_flex_backend_forward_matches_too():
    torch.manual_seed(0)
    pattern = AttentionPattern("fixed", block_size=16, stride=32, summary=16, heads="split")
    layout = pattern.layout(2, 64)
    memory = memory_of(pattern, 2, 16, 16, layout)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    with torch.no_grad():
        out = memory.attend(get_backend("flex", q.device), q, k, v)
        expected = dense_with_memory(q, k, v, memory.keys * 4, memory.values * 4, element_mask(layout, 16))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "value,message",
    [
        (-8, "persistent_memory=-8 must be an int >= 0"),
        (12, "persistent_memory=12 must be a multiple of pattern block_size=8"),
    ],
)
def test_bad_memory_size_is_refused(value, message):
    with pytest.raises(InputError, match=message):
        ModelConfig(seq_len=64, d_model=32, n_layers=2, n_heads=2, pattern=AttentionPattern(block_size=8), attention=Sparse(persistent_memory=value))


def test_block_without_ffn_has_the_expected_parameters():
    C, H, M = 32, 2, 16
    config = ModelConfig(d_model=C, n_heads=H, pattern=AttentionPattern(block_size=8), attention=Sparse(backend="reference"))
    plain = Block(config, seq_len=64, layer=0)
    block = Block(dataclasses.replace(config, attention=Sparse("reference", persistent_memory=M)), seq_len=64, layer=0)
    assert block.mlp is None and block.norm2 is None
    attention = 3 * C * C + 3 * C + C * C + C  # qkv and proj with biases
    memory = 2 * H * M * (C // H)  # keys and values: M vectors of d_head per head
    assert sum(p.numel() for p in block.parameters()) == 2 * C + attention + memory
    ffn = 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)  # norm2, fc, proj
    assert sum(p.numel() for p in plain.parameters()) == 2 * C + attention + ffn
    names = {n for n, _ in block.named_parameters()}
    assert {"attn.memory.keys", "attn.memory.values"} <= names and not any("mlp" in n for n in names)


def test_residual_init_counts_one_branch_per_all_attention_block():
    torch.manual_seed(0)
    pattern = AttentionPattern(block_size=8)
    model = SparseTransformer(ModelConfig(seq_len=64, d_model=256, n_layers=4, n_heads=4, pattern=pattern, attention=Sparse(persistent_memory=8)))
    std = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks]).std().item()
    assert abs(std - 0.02 / math.sqrt(4)) < 0.001


def test_all_attention_model_trains_without_ffn():
    """A tiny all-attention model learns to continue a fixed byte string; its memory is trained too."""
    torch.manual_seed(0)
    pattern = AttentionPattern("strided", block_size=8, stride=16, heads="split")
    config = ModelConfig(seq_len=32, d_model=32, n_layers=2, n_heads=2, pattern=pattern, attention=Sparse("blocks", persistent_memory=8))
    model = SparseTransformer(config)
    data = torch.randint(0, 256, (4, 33))
    before = model.blocks[0].attn.memory.keys.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0 and losses[-1] < 0.5 * losses[0], losses[::10]
    assert not torch.equal(model.blocks[0].attn.memory.keys, before)


def test_memory_in_an_hourglass_gives_the_same_logits_on_every_backend():
    torch.manual_seed(0)
    pattern = AttentionPattern("fixed", block_size=16, stride=32, summary=16, heads="split")
    hourglass = HourglassConfig("1@1 1@2 1@1")
    config = ModelConfig(seq_len=64, d_model=32, n_layers=3, n_heads=2, pattern=pattern, attention=Sparse(persistent_memory=16), hourglass=hourglass)
    model = SparseTransformer(config)
    x = torch.randint(0, 256, (2, 50))
    logits = {}
    for backend in ("reference", "blocks", "cpp", "pieces", "triton"):
        for block in model.all_blocks():
            block.attn.backend = backend
        logits[backend] = model.eval()(x)
    torch.testing.assert_close(logits["blocks"], logits["reference"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["cpp"], logits["reference"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["pieces"], logits["reference"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=1e-5, rtol=1e-5)
