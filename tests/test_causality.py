"""One causality test for every attention kind x architecture x pattern x backend: changing the input at
position t never changes an output before t, and does change the output at t.

Positions are chosen to sit on both sides of every shortening boundary of the hourglass factors used
(2, 3, 6), so a leak through the pooling or the upsampling shows up. To cover a new attention kind, add
its model arguments to ATTENTION; a new architecture option, to ARCHITECTURES.
"""

import pytest
import torch

from sparse_transformer.model import AdaptiveSpan, AttentionPattern, HourglassConfig, ModelConfig, Performer, Sparse, SparseTransformer

SEQ_LEN = 48
POSITIONS = [0, 1, 2, 3, 5, 6, 7, 11, 12, 13, 17, 18, 23, 24, 29, 35, 36, 46, 47]

# name -> the attention kind, for a block-sparse backend (only sparse attention has backends to choose)
ATTENTION = {
    "sparse": lambda backend: Sparse(backend),
    "memory": lambda backend: Sparse(backend, persistent_memory=8),
    "performer": lambda backend: Performer(),
    "adaptive_span": lambda backend: AdaptiveSpan(max_span=32, ramp=4, init=0.5, chunk_size=16),
}

# name -> ModelConfig options of an architecture option (with the n_layers they imply).
ARCHITECTURES = {
    "plain": dict(n_layers=2),
    "hourglass": dict(n_layers=4, hourglass=HourglassConfig("1@1 2@3 1@1")),
    "hourglass-nested-avg-repeat": dict(
        n_layers=5, hourglass=HourglassConfig("1@1 1@2 1@6 1@2 1@1", pooling="avg", upsampling="repeat")
    ),
    "hourglass-attention-resampling": dict(n_layers=3, hourglass=HourglassConfig("1@1 1@3 1@1", attention_resampling=True)),
    "hourglass-deep": dict(n_layers=5, hourglass=HourglassConfig("1@1 1@2 1@6 1@2 1@1")),
}

PATTERNS = {
    "dense": AttentionPattern("dense", block_size=8),
    "strided": AttentionPattern("strided", block_size=8, stride=16, heads="split"),
    "fixed": AttentionPattern("fixed", block_size=8, stride=16, summary=8, heads="interleaved"),
    "local": AttentionPattern("local", block_size=8, stride=8),
}


def cases() -> list[tuple[str, str, str, str]]:
    """Every combination the model accepts: Performer is dense only, and only sparse attention (with or
    without persistent memory) has block-sparse backends to choose."""
    out = []
    for attention in ATTENTION:
        for architecture in ARCHITECTURES:
            for pattern in PATTERNS if attention != "performer" else ["dense"]:
                for backend in ["reference", "blocks", "cpp", "pieces"] if attention in ("sparse", "memory") else ["auto"]:
                    out.append((attention, architecture, pattern, backend))
    return out


@pytest.mark.parametrize("attention,architecture,pattern,backend", cases())
def test_outputs_before_t_never_depend_on_position_t(attention, architecture, pattern, backend):
    torch.manual_seed(0)
    args = dict(seq_len=SEQ_LEN, d_model=32, n_heads=2, pattern=PATTERNS[pattern], attention=ATTENTION[attention](backend))
    model = SparseTransformer(ModelConfig(**args, **ARCHITECTURES[architecture])).eval()
    x = torch.randint(0, 256, (1, SEQ_LEN))
    batch = x.repeat(len(POSITIONS) + 1, 1)  # row 0 unchanged, row r + 1 changed at POSITIONS[r]
    for r, t in enumerate(POSITIONS):
        batch[r + 1, t] = (batch[r + 1, t] + 1 + r) % 256
    with torch.no_grad():
        out = model(batch)  # (R, N, vocab)
    for r, t in enumerate(POSITIONS):
        assert torch.equal(out[r + 1, :t], out[0, :t]), f"position {t} changed an earlier output"
        assert not torch.allclose(out[r + 1, t], out[0, t]), f"position {t} did not change its own output"
