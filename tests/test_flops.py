"""Each attention kind's own FLOP count, through the model's ``flops_per_token``, against what
``torch.utils.flop_counter.FlopCounterMode`` counts in a forward pass on small shapes.

FlopCounterMode counts matrix products (2 FLOPs per multiply-add), as the model's count does. Block-sparse
attention runs through a backend that computes exactly the tiles of the layout, one row of tiles at a time,
so what is counted is the layout's work (the real backends add padding, which is not model FLOPs), and
nn.MultiheadAttention runs on PyTorch's math kernel, which FlopCounterMode can see into. The counts must
agree to a relative 1e-9 (float rounding). The one piece of work the model's count leaves out on purpose,
the persistent memory's dummy query rows (causal tiles in the memory's corner of the layout), is added
back here from its definition.
"""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sparse_transformer.model import AdaptiveSpan, AttentionPattern, HourglassConfig, ModelConfig, Performer, Sparse, SparseTransformer
from sparse_transformer.model.attention import sparse as sparse_attention

SEQ_LEN, BATCH = 96, 2
STRIDED = AttentionPattern("strided", block_size=8, stride=24, heads="split")

KINDS = {
    "dense": dict(pattern=AttentionPattern("dense", block_size=8)),
    "strided": dict(pattern=STRIDED),
    "fixed": dict(pattern=AttentionPattern("fixed", block_size=8, stride=32, summary=8, heads="interleaved")),
    "local": dict(pattern=AttentionPattern("local", block_size=16, stride=32)),
    "persistent_memory": dict(pattern=STRIDED, attention=Sparse(persistent_memory=16)),
    "performer": dict(attention=Performer(features=24, chunk_size=40)),
    "adaptive_span": dict(pattern=STRIDED, attention=AdaptiveSpan(max_span=64, ramp=8, init=0.3, chunk_size=20)),
    "hourglass": dict(pattern=STRIDED, n_layers=4, hourglass=HourglassConfig("1@1 2@3 1@1")),
    "hourglass_resampling": dict(
        pattern=STRIDED, n_layers=5, hourglass=HourglassConfig("1@1 1@2 1@4 1@2 1@1", attention_resampling=True)
    ),
    "hourglass_memory_avg": dict(
        pattern=STRIDED, n_layers=3, attention=Sparse(persistent_memory=8), hourglass=HourglassConfig("1@1 1@2 1@1", pooling="avg", upsampling="repeat")
    ),
    "hourglass_performer": dict(attention=Performer(), n_layers=3, hourglass=HourglassConfig("1@1 1@3 1@1")),
}


def dummy_rows(model: SparseTransformer) -> float:
    """FLOPs of the memory's dummy query rows: m (m + 1) / 2 tiles per head for m memory blocks, every layer."""
    config, bs = model.config, model.config.pattern.block_size
    m = getattr(config.attention, "persistent_memory", 0) // bs
    return config.n_layers * config.n_heads * m * (m + 1) / 2 * 2 * 2 * config.head_dim * bs * bs


def tile_attention(q, k, v, layout, block_size, scale=None):
    """Exactly the layout's tiles: each query block against the key blocks its row lists, causal inside."""
    B, H, N, D = q.shape
    scale = scale or 1 / math.sqrt(D)
    out = torch.zeros_like(q)
    pos = torch.arange(N)
    for h in range(H):
        for r in range(N // block_size):
            cols = layout.row(h, r).long()
            keys = torch.cat([pos[c * block_size : (c + 1) * block_size] for c in cols])  # (w * bs,)
            rows = pos[r * block_size : (r + 1) * block_size]
            scores = q[:, h, rows] @ k[:, h, keys].transpose(-1, -2) * scale  # (B, bs, w * bs)
            scores = scores.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
            out[:, h, rows] = torch.softmax(scores, -1) @ v[:, h, keys]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_counts_the_work_it_does(kind, monkeypatch):
    torch.manual_seed(0)
    options = {"n_layers": 2, **KINDS[kind]}
    model = SparseTransformer(ModelConfig(seq_len=SEQ_LEN, d_model=32, n_heads=4, **options)).eval()
    monkeypatch.setattr(sparse_attention, "get_backend", lambda name, device: tile_attention)
    monkeypatch.setattr(sparse_attention, "get_packed_backend", lambda name, device: None)  # q, k, v through tile_attention
    x = torch.randint(0, 256, (BATCH, SEQ_LEN))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    counted, ours = counter.get_total_flops(), model.flops_per_token() * SEQ_LEN * BATCH
    assert abs(ours + BATCH * dummy_rows(model) - counted) <= 1e-9 * counted, (ours, counted)


def test_adaptive_span_count_follows_the_spans():
    config = ModelConfig(seq_len=SEQ_LEN, d_model=32, n_heads=4, **KINDS["adaptive_span"])
    model = SparseTransformer(config)
    before = model.flops_per_token()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.span_fraction.fill_(0.0)
    assert model.flops_per_token() < before
