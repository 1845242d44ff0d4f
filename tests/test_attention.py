"""The attention module and its reference backend: exact against plain softmax, causal for every pattern."""

import pytest
import torch
import torch.nn.functional as F

from sparse_transformer.model import ModelConfig, Sparse
from sparse_transformer.model.attention.sparse import SparseAttention
from sparse_transformer.model.config import ConfigError
from sparse_transformer.model.kernels import get_backend
from sparse_transformer.model.kernels.reference import reference_attention
from sparse_transformer.model.patterns import AttentionPattern

PATTERNS = [
    AttentionPattern("dense", block_size=4),
    AttentionPattern("local", block_size=4, stride=8),
    AttentionPattern("strided", block_size=4, stride=8, heads="split"),
    AttentionPattern("fixed", block_size=4, stride=8, summary=2, heads="merged"),
    AttentionPattern("fixed", block_size=1, stride=8, summary=2, heads="split"),
]


def test_reference_dense_equals_softmax_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 32, 16).unbind(0)
    layout = AttentionPattern("dense", block_size=8).layout(4, 32)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(reference_attention(q, k, v, layout, 8), expected, atol=1e-5, rtol=1e-5)


def test_reference_applies_scale():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)
    layout = AttentionPattern("dense", block_size=4).layout(2, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1)
    torch.testing.assert_close(reference_attention(q, k, v, layout, 4, scale=0.1), expected, atol=1e-5, rtol=1e-5)


def test_reference_sparse_equals_explicit_masked_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 32, 8).unbind(0)
    p = AttentionPattern("strided", block_size=1, stride=4, heads="split")
    mask = p.mask(2, 32)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(reference_attention(q, k, v, p.layout(2, 32), 1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.kind}-{p.heads}-bs{p.block_size}")
@pytest.mark.parametrize("backend", ["reference", "blocks", "cpp", "pieces"])
def test_outputs_never_depend_on_the_future(pattern, backend):
    torch.manual_seed(0)
    n, t = 32, 13
    attn = SparseAttention(ModelConfig(d_model=16, n_heads=2, pattern=pattern, attention=Sparse(backend)), n, layer=1)
    x = torch.randn(2, n, 16)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, n - t - 1, 16)
    y, y2 = attn(x), attn(x2)
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1])
    assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="attention backend 'cudnn' is not one of auto, triton"):
        get_backend("cudnn", torch.device("cpu"))
    with pytest.raises(ConfigError, match="attention backend 'cudnn' is not one of"):
        Sparse(backend="cudnn")
