"""FAVOR+ against exact softmax attention, its chunked prefix sums, causality, low precision, feature redraws."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from sparse_transformer.errors import InputError
from sparse_transformer.model import AttentionPattern, ModelConfig, Performer
from sparse_transformer.model.attention.performer import PerformerAttention, favor_causal, orthogonal_gaussian
from sparse_transformer.training.lightning_module import SparseTransformerLM


def performer(features: int, chunk_size: int = 64, d_model: int = 32, n_heads: int = 2) -> PerformerAttention:
    options = Performer(features=features, chunk_size=chunk_size)
    config = ModelConfig(d_model=d_model, n_heads=n_heads, pattern=AttentionPattern("dense"), attention=options)
    return PerformerAttention(config, seq_len=64, layer=0)


def qkv(n: int = 64, d: int = 16, scale: float = 0.5, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, 2, 2, n, d, generator=g, dtype=dtype)  # (B, H, N, D) each
    return [q * scale, k * scale, v]


def test_orthogonal_features_are_orthogonal_within_blocks():
    w = orthogonal_gaussian(40, 16, torch.Generator().manual_seed(0))
    assert w.shape == (40, 16)
    for block in (w[:16], w[16:32]):
        gram = block @ block.T
        torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros(16, 16), atol=1e-4, rtol=0)


def test_error_shrinks_as_features_grow():
    q, k, v = qkv()
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    errors = []
    for m in (16, 256, 4096):
        per_seed = [
            (favor_causal(q, k, v, orthogonal_gaussian(m, 16, torch.Generator().manual_seed(s)).double(), 16) - exact)
            .abs()
            .mean()
            for s in range(3)
        ]
        errors.append(torch.stack(per_seed).mean().item())
    assert errors[0] > 2 * errors[1] > 4 * errors[2], errors  # about 1/sqrt(m): 4x per 16x features
    assert errors[2] < 0.01


@pytest.mark.parametrize("chunk", [1, 7, 64, 100])
def test_chunking_does_not_change_the_result(chunk):
    q, k, v = qkv(scale=2.0)  # large exponents: the running stabiliser is exercised across chunks
    w = orthogonal_gaussian(32, 16, torch.Generator().manual_seed(0)).double()
    phi = [torch.exp(x * 16**-0.25 @ w.T - (x * 16**-0.25).pow(2).sum(-1, keepdim=True) / 2) for x in (q, k)]
    weights = (phi[0] @ phi[1].transpose(-1, -2)).tril()  # the quadratic form FAVOR+ avoids, (B, H, N, N)
    expected = weights @ v / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(favor_causal(q, k, v, w, chunk).double(), expected, rtol=1e-4, atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_by_n_matrix_forward_or_backward():
    n, m, d, chunk = 1024, 16, 16, 64
    q, k, v = (x.requires_grad_() for x in qkv(n=n, d=d, dtype=torch.float32))
    with LargestTensor() as mode:
        favor_causal(q, k, v, orthogonal_gaussian(m, d), chunk).sum().backward()
    assert mode.largest <= 4 * n * max(m, d, chunk) < n * n  # (B, H, N, m) or (B, H, N, D): O(N), never N x N


def test_causal_even_when_a_later_input_is_huge():
    torch.manual_seed(0)
    attn = performer(features=16, chunk_size=8).eval()
    x = torch.randn(2, 40, 32)
    t = 21  # mid-chunk: a later key in the same chunk must not move the stabiliser of earlier queries
    changed = x.clone()
    changed[:, t] *= 100
    with torch.no_grad():
        y, y2 = attn(x), attn(changed)
    assert torch.equal(y[:, :t], y2[:, :t])
    assert not torch.allclose(y[:, t], y2[:, t])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stable_in_low_precision(dtype):
    q, k, v = (x.to(dtype) for x in qkv(scale=4.0, dtype=torch.float32))  # exp(w·x - |x|²/2) reaches e^40
    w = orthogonal_gaussian(64, 16, torch.Generator().manual_seed(0))
    low = favor_causal(q, k, v, w, 16)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low, favor_causal(q.double(), k.double(), v.double(), w.double(), 16).float())


def test_only_the_dense_pattern_is_accepted():
    args = dict(seq_len=32, d_model=16, n_layers=1, n_heads=2, attention=Performer())
    ModelConfig(**args, pattern=AttentionPattern("dense", block_size=8))
    with pytest.raises(InputError, match="attention 'performer' is global causal linear attention; pattern.kind='strided'"):
        ModelConfig(**args, pattern=AttentionPattern("strided", block_size=8, stride=16))
    with pytest.raises(InputError, match="performer features=0 must be >= 1"):
        Performer(features=0)


def test_redraw_is_seeded_by_step_and_saved_in_the_state_dict():
    attn = performer(features=8)
    assert {"seed", "features"} <= set(attn.state_dict())
    attn.redraw(10)
    first = attn.features.clone()
    attn.redraw(20)
    assert not torch.equal(first, attn.features)
    attn.redraw(10)
    assert torch.equal(first, attn.features)  # a resumed run draws the same features at the same step


class FeatureLog(L.Callback):
    """Records layer 0's features after every training step and around every validation batch."""

    def __init__(self):
        self.train, self.val = [], []

    def features(self, module) -> torch.Tensor:
        return module.model.blocks[0].attn.features.clone()

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.train.append(self.features(module))

    def on_validation_batch_start(self, trainer, module, *args) -> None:
        self.val.append(self.features(module))

    def on_validation_batch_end(self, trainer, module, *args) -> None:
        assert torch.equal(self.val[-1], self.features(module))


def test_redraw_follows_the_training_step_and_never_happens_in_eval(tmp_path):
    torch.manual_seed(0)
    network = ModelConfig(
        seq_len=16,
        d_model=16,
        n_layers=1,
        n_heads=2,
        pattern=AttentionPattern("dense", block_size=8),
        attention=Performer(features=8, redraw_every=2),
    )
    lm = SparseTransformerLM(network, warmup_steps=1)
    data = DataLoader(torch.randint(0, 256, (24, 17)), batch_size=4)
    log = FeatureLog()
    trainer = L.Trainer(
        max_steps=5,
        val_check_interval=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=[log],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(lm, data, data)
    same = [torch.equal(a, b) for a, b in zip(log.train, log.train[1:])]
    assert same == [True, False, True, False]  # steps 0-1 initial, new features at steps 2 and 4
    assert torch.equal(log.val[0], log.train[2])  # validation after step 3 uses the step-2 features
    lm.eval()
    lm.model.before_step(6)
    assert torch.equal(lm.model.blocks[0].attn.features, log.train[-1])
