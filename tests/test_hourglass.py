"""Hourglass: the spec notation, the shift before pooling, the upsampling, padding, and the model around it."""

import dataclasses

import pytest
import torch

from sparse_transformer.errors import InputError
from sparse_transformer.model import AttentionPattern, ModelConfig, Sparse, SparseTransformer
from sparse_transformer.model.hourglass import Shortening, Upsampling, shortened_len
from sparse_transformer.model.hourglass_spec import HourglassConfig, HourglassError, parse_spec

PATTERN = AttentionPattern("strided", block_size=8, stride=16, heads="interleaved")


def options(d_model: int, n_heads: int, block_size: int, hourglass: HourglassConfig) -> ModelConfig:
    """The model options a Shortening or Upsampling of this hourglass reads."""
    pattern = AttentionPattern(block_size=block_size)
    return ModelConfig(d_model=d_model, n_heads=n_heads, n_layers=hourglass.n_layers, pattern=pattern, hourglass=hourglass)


def tiny(spec: str, **kwargs) -> SparseTransformer:
    hourglass = HourglassConfig(spec, **kwargs)
    args = dict(seq_len=64, d_model=32, n_layers=hourglass.n_layers, n_heads=2, pattern=PATTERN, attention=Sparse("reference"))
    return SparseTransformer(ModelConfig(**args, hourglass=hourglass))


def test_spec_in_the_papers_notation():
    assert parse_spec("2@1 4@3 2@1") == [(2, 1), (4, 3), (2, 1)]
    assert parse_spec("1@1 2@2 4@8 2@2 1@1") == [(1, 1), (2, 2), (4, 8), (2, 2), (1, 1)]
    assert parse_spec("4@1") == [(4, 1)]
    assert HourglassConfig("0@1 3@2 1@1").n_layers == 4


@pytest.mark.parametrize(
    "spec,message",
    [
        ("2@1 4@3", "must be an odd number of layers@factor tokens"),
        ("2@1 4@3 2@2", "must be an odd number of layers@factor tokens"),
        ("2@2 4@4 2@2", "must be an odd number of layers@factor tokens"),
        ("", "must be an odd number of layers@factor tokens"),
        ("1@1 1@3 2@4 1@3 1@1", "factor 4 after 3 must be a larger multiple of it"),
        ("1@1 1@4 2@2 1@4 1@1", "factor 2 after 4 must be a larger multiple of it"),
        ("2@1 0@3 2@1", "the innermost level needs at least 1 layer"),
        ("2@1 4x3 2@1", "token '4x3' is not layers@factor"),
        ("2@1 4@0 2@1", "token '4@0' is not layers@factor"),
        ("2@1 -1@3 2@1", "token '-1@3' is not layers@factor"),
    ],
)
def test_bad_spec_is_refused_in_one_line(spec, message):
    with pytest.raises(HourglassError, match=message):
        HourglassConfig(spec).check()


def test_bad_options_are_refused():
    with pytest.raises(HourglassError, match="hourglass pooling 'max' is not one of avg, linear"):
        HourglassConfig("1@1 1@2 1@1", pooling="max").check()
    with pytest.raises(HourglassError, match="hourglass upsampling 'nearest' is not one of repeat, linear"):
        tiny("1@1 1@2 1@1", upsampling="nearest")


def test_n_layers_must_match_the_spec():
    with pytest.raises(
        InputError, match="n_layers=4 does not match the 8 layers of hourglass spec '2@1 4@3 2@1'; set n_layers to 8"
    ):
        ModelConfig(seq_len=64, d_model=32, n_layers=4, n_heads=2, pattern=PATTERN, hourglass=HourglassConfig("2@1 4@3 2@1"))


def test_levels_get_layouts_for_their_own_padded_length_and_global_layer_indices():
    model = tiny("2@1 4@3 2@1")
    hg = model.hourglass
    assert model.blocks is None
    assert [len(hg.pre), len(hg.inner.pre), len(hg.post)] == [2, 4, 2]
    assert shortened_len(64, 3, 8) == 24  # ceil(64 / 3) = 22, padded to whole blocks of 8
    for i, block in enumerate(hg.inner.pre):
        assert block.attn.layout is PATTERN.layout(2, 24, 2 + i)  # layers 2..5, alternating rules
    assert hg.post[1].attn.layout is PATTERN.layout(2, 64, 7)


def test_shortening_shifts_right_by_k_minus_1_then_pools():
    """Token g of avg pooling is the mean of positions g*k - k + 1 ... g*k, zeros before the start."""
    torch.manual_seed(0)
    k, x = 3, torch.randn(2, 16, 4)
    s = Shortening(k, options(4, 2, 8, HourglassConfig("1@1 1@3 1@1", pooling="avg")))(x)
    assert s.shape == (2, 8, 4)  # ceil(16 / 3) = 6 tokens, padded to a block of 8
    padded = torch.cat([torch.zeros(2, k - 1, 4), x], dim=1)
    for g in range(6):
        window = padded[:, g * k : g * k + k]  # original positions g*k - 2 ... g*k, clipped at the end
        torch.testing.assert_close(s[:, g], window.sum(1) / k)
    assert not s[:, 6:].any()


@pytest.mark.parametrize("pooling", ["avg", "linear"])
@pytest.mark.parametrize("attention_resampling", [False, True])
def test_shortened_token_depends_exactly_on_its_window(pooling, attention_resampling):
    """The Jacobian of token g reaches positions g*k - k + 1 ... g*k and nothing else: no future leaks in."""
    torch.manual_seed(0)
    k, n = 4, 24
    config = HourglassConfig("1@1 1@4 1@1", pooling=pooling, attention_resampling=attention_resampling)
    shorten = Shortening(k, options(8, 2, 1, config))
    x = torch.randn(1, n, 8, requires_grad=True)
    s = shorten(x)
    for g in range(n // k):
        (grad,) = torch.autograd.grad(s[0, g].sum(), x, retain_graph=True)
        reached = grad[0].abs().sum(-1).nonzero().flatten().tolist()
        assert reached == list(range(max(g * k - k + 1, 0), g * k + 1)), (g, reached)


@pytest.mark.parametrize("upsampling", ["repeat", "linear"])
@pytest.mark.parametrize("attention_resampling", [False, True])
def test_upsampled_position_sees_only_tokens_up_to_its_own(upsampling, attention_resampling):
    torch.manual_seed(0)
    k, m, n = 3, 6, 16
    config = HourglassConfig("1@1 1@3 1@1", upsampling=upsampling, attention_resampling=attention_resampling)
    up = Upsampling(k, options(8, 2, 8, config))
    s = torch.randn(1, m, 8, requires_grad=True)
    out = up(s, torch.zeros(1, n, 8))
    assert out.shape == (1, n, 8)
    for i in range(n):
        (grad,) = torch.autograd.grad(out[0, i].sum(), s, retain_graph=True)
        reached = grad[0].abs().sum(-1).nonzero().flatten().tolist()
        expected = list(range(i // k + 1)) if attention_resampling else [i // k]
        assert reached == expected, (i, reached)
    if upsampling == "repeat" and not attention_resampling:
        torch.testing.assert_close(out[0, 7], s[0, 2].detach())


@pytest.mark.parametrize("spec", ["2@1 2@3 2@1", "1@1 1@2 2@6 1@2 1@1"])
def test_lengths_the_factors_do_not_divide_are_padded(spec):
    torch.manual_seed(0)
    model = tiny(spec).eval()
    x = torch.randint(0, 256, (2, 64))
    full = model(x)
    for n in (1, 13, 50):
        torch.testing.assert_close(model(x[:, :n]), full[:, :n])


def test_linear_resampling_adds_the_expected_parameters():
    torch.manual_seed(0)
    C, k = 32, 3
    flat = SparseTransformer(ModelConfig(seq_len=64, d_model=C, n_layers=3, n_heads=2, pattern=PATTERN))
    linear = tiny("1@1 1@3 1@1")
    simple = tiny("1@1 1@3 1@1", pooling="avg", upsampling="repeat")
    assert simple.num_params() == flat.num_params()
    assert linear.num_params() - flat.num_params() == (k * C * C + C) + (C * k * C + k * C)


def test_recompute_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny("1@1 1@2 2@4 1@2 1@1", attention_resampling=True)
    x = torch.randint(0, 256, (2, 40))
    grads = []
    for recompute in (False, True):
        model.config = dataclasses.replace(model.config, recompute=recompute)
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_config_survives_a_weights_only_checkpoint_load(tmp_path):
    config = HourglassConfig("1@1 2@3 1@1", pooling="avg", attention_resampling=True)
    torch.save({"hourglass": config}, tmp_path / "h.pt")
    assert torch.load(tmp_path / "h.pt", weights_only=True)["hourglass"] == config
