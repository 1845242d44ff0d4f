"""Adaptive span: the ramp mask and its gradient, cropping against full masking, the pattern, the penalty."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparse_transformer.errors import InputError
from sparse_transformer.model import AdaptiveSpan, ModelConfig, Sparse, SparseTransformer
from sparse_transformer.model.attention.adaptive_span import AdaptiveSpanAttention, ramp_mask
from sparse_transformer.model.attention.sparse import SparseAttention
from sparse_transformer.model.layout import element_mask
from sparse_transformer.model.patterns import AttentionPattern
from sparse_transformer.training.lightning_module import SparseTransformerLM

STRIDED = AttentionPattern("strided", block_size=4, stride=8, heads="split")


def span_attention(spans: list[float], max_span: int = 64, ramp: int = 4, chunk: int = 8, n: int = 48) -> AdaptiveSpanAttention:
    torch.manual_seed(0)
    config = AdaptiveSpan(max_span=max_span, ramp=ramp, chunk_size=chunk)
    network = ModelConfig(d_model=16, n_heads=len(spans), pattern=STRIDED, attention=config)
    attn = AdaptiveSpanAttention(network, n, layer=0)
    with torch.no_grad():
        attn.span_fraction.copy_(torch.tensor(spans) / max_span)
    return attn.eval()


def masked_reference(attn: AdaptiveSpanAttention, x: torch.Tensor) -> torch.Tensor:
    """Every key computed, the span applied as a mask: what cropping must reproduce."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).view(B, N, 3, attn.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
    allowed = element_mask(attn.layout, attn.block_size)[:, :N, :N]  # (H, N, N)
    pos = torch.arange(N)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, -1) * ramp_mask(attn.spans(), pos[:, None] - pos[None, :], attn.options.ramp)
    y = weights / weights.sum(-1, keepdim=True) @ v  # (B, H, N, D)
    return attn.proj(y.transpose(1, 2).reshape(B, N, C))


def test_ramp_mask_values_and_gradient():
    z = torch.tensor([2.5], requires_grad=True)
    distance = torch.arange(9.0).unsqueeze(0)  # (1, 9)
    m = ramp_mask(z, distance, ramp=4)
    torch.testing.assert_close(m[0, 0], torch.tensor([1, 1, 1, 0.875, 0.625, 0.375, 0.125, 0, 0]))
    m.sum().backward()
    assert z.grad.item() == pytest.approx(4 / 4)  # 1/R for each of the four keys on the ramp


def test_span_gets_a_gradient_from_the_data_loss():
    attn = span_attention([5.0, 20.0]).train()
    attn(torch.randn(2, 48, 16)).pow(2).sum().backward()
    assert (attn.span_fraction.grad != 0).all()


@pytest.mark.parametrize("spans", [[0.0, 0.0], [3.5, 17.0], [64.0, 10.0]])
def test_cropping_gives_the_masked_result(spans):
    attn = span_attention(spans)
    x = torch.randn(2, 48, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), masked_reference(attn, x))


def test_cost_falls_with_the_span():
    x = torch.randn(1, 48, 16)

    def flops(spans: list[float]) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            span_attention(spans)(x)
        return counter.get_total_flops()

    assert flops([2.0, 2.0]) < flops([16.0, 2.0]) < flops([64.0, 2.0])


def test_full_span_is_the_sparse_pattern():
    n = 32
    attn = span_attention([n, n], max_span=n, n=n)
    sparse = SparseAttention(ModelConfig(d_model=16, n_heads=2, pattern=STRIDED, attention=Sparse(backend="reference")), n, layer=0)
    sparse.load_state_dict(attn.state_dict(), strict=False)
    x = torch.randn(2, n, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), sparse(x))


def test_causal():
    attn = span_attention([6.0, 30.0])
    x = torch.randn(2, 48, 16)
    changed = x.clone()
    changed[:, 29] += 10
    with torch.no_grad():
        y, y2 = attn(x), attn(changed)
    assert torch.equal(y[:, :29], y2[:, :29]) and not torch.allclose(y[:, 29], y2[:, 29])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_penalty_is_added_to_the_training_loss_and_spans_are_logged():
    torch.manual_seed(0)
    config = AdaptiveSpan(max_span=32, ramp=4, init=0.25, penalty=0.01)
    lm = SparseTransformerLM(
        ModelConfig(seq_len=32, d_model=16, n_layers=2, n_heads=2, pattern=STRIDED, attention=config)
    )
    batch = torch.randint(0, 256, (2, 33))
    assert lm.model.auxiliary_loss().item() == pytest.approx(2 * 0.01 * 8.0)  # 2 layers, mean span 0.25 * 32
    torch.testing.assert_close(lm.training_step(batch, 0), lm._loss(batch) + lm.model.auxiliary_loss())
    metrics = lm.model.metrics()
    assert metrics["span/blocks.1.attn/head0"] == pytest.approx(8.0) and len(metrics) == 4


def test_spans_return_to_range_before_each_step():
    model = SparseTransformer(ModelConfig(seq_len=32, d_model=16, n_layers=1, n_heads=2, pattern=STRIDED, attention=AdaptiveSpan()))
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.span_fraction.copy_(torch.tensor([-0.5, 1.5]))
    model.before_step(1)
    assert attn.span_fraction.tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_span=0), "adaptive_span max_span=0 must be >= 1"),
        (dict(init=1.5), r"adaptive_span init=1.5 must be a fraction of max_span in \[0, 1\]"),
        (dict(penalty=-1.0), "adaptive_span penalty=-1.0 must be >= 0"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        AdaptiveSpan(**kwargs)

