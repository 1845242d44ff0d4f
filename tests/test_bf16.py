"""bf16 on the CPU: every CPU backend (cpp, pieces, blocks, reference) within bf16 tolerances of fp64 attention
written out below, forward and backward, on each pattern, under autocast and under bf16-true's default dtype; and
training through train.py in bf16-mixed. The fp64 attention shares no code with the backends: the reference is
one of the backends judged here, not the judge. The Triton interpreter is left out: it is silently wrong in bf16
(its bf16 tests run on a GPU, test_kernel_triton.py)."""

import csv
import math

import pytest
import torch
from commands import run

from sparse_transformer.model.kernels import get_backend, reference
from sparse_transformer.model.layout import BlockLayout
from sparse_transformer.model.patterns import AttentionPattern

TOLERANCE = 2e-2  # of the fp64 result's max |value|: bf16 keeps 8 bits of mantissa
PATTERNS = [
    AttentionPattern("strided", block_size=16, stride=64, heads="split"),
    AttentionPattern("fixed", block_size=16, stride=64, summary=16, heads="merged"),
    AttentionPattern("local", block_size=16, stride=32),
]
CPU = torch.device("cpu")


def attention_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in fp64, each query over the keys of its layout's tiles that are not after it."""
    n = q.shape[-2]
    tiles = layout.to_dense().repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)  # (H, N, N)
    seen = tiles & torch.ones(n, n, dtype=torch.bool).tril()
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    return scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v.double()


def check_bf16(attend, layout: BlockLayout, block_size: int, B: int = 2, D: int = 16) -> None:
    """Output and dq, dk, dv (random upstream grad) of ``attend`` on bf16 inputs within ``TOLERANCE`` times the
    largest value (at least 1) of :func:`attention_fp64` on the same values."""
    H, N = layout.shape[0], layout.shape[1] * block_size
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float32).to(torch.bfloat16).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, N, D, dtype=torch.float32).to(torch.bfloat16)
    out = attend(q, k, v, layout, block_size)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = attention_fp64(q64, k64, v64, layout, block_size)
    want = (expected, *torch.autograd.grad(expected, (q64, k64, v64), grad.double()))
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (g.double() - w).abs().max().item()
        bound = TOLERANCE * max(w.abs().max().item(), 1.0)
        assert err <= bound, f"{name}: max error {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.kind}-{p.heads}")
@pytest.mark.parametrize("backend", ["cpp", "pieces", "blocks", "reference"])
def test_bf16_matches_fp64_attention(backend, pattern):
    check_bf16(get_backend(backend, CPU), pattern.layout(4, 256, layer=1), 16)


def test_the_check_catches_a_reference_that_sees_the_future(monkeypatch):
    """Diagonal tiles left whole let a query see up to 15 later keys: the reference's bf16 case fails, as it could
    not when the reference was judged by itself."""
    whole_tiles = lambda layout, bs: layout.to_dense().repeat_interleave(bs, -2).repeat_interleave(bs, -1)  # noqa: E731
    monkeypatch.setattr(reference, "element_mask", whole_tiles)
    with pytest.raises(AssertionError, match="out: max error"):
        check_bf16(get_backend("reference", CPU), PATTERNS[0].layout(4, 256, layer=1), 16)


@pytest.mark.parametrize("backend", ["cpp", "pieces"])
def test_bf16_autocast_gives_bf16_attention_and_finite_gradients(backend):
    """Under autocast, as bf16-mixed trains, the linear layers hand the backend bf16 q, k, v."""
    layout = PATTERNS[0].layout(2, 128)
    linear = torch.nn.Linear(16, 3 * 16)
    x = torch.randn(2, 128, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = linear(x).view(2, 128, 3, 1, 16).expand(-1, -1, -1, 2, -1).unbind(2)
        out = get_backend(backend, CPU)(*(t.transpose(1, 2) for t in (q, k, v)), layout, 16)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(linear.weight.grad).all()


@pytest.mark.parametrize("backend", ["cpp", "pieces"])
def test_a_bf16_default_dtype_as_bf16_true_sets_it(backend):
    """bf16-true makes bf16 the default dtype while the model runs: a backend's fp32 scratch must say so."""
    layout = PATTERNS[1].layout(2, 128)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        check_bf16(get_backend(backend, CPU), layout, 16)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.slow
def test_train_py_trains_in_bf16_mixed(tmp_path):
    """The real command line, forward, backward and validation under bf16 autocast: the losses it logs are finite,
    and a checkpoint is written."""
    result = run(
        "train.py", "fit", "--config", "configs/tiny.yaml", "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "4",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    for name, count in (("train_bpb_step", 4), ("val_bpb", 1)):
        values = [float(row[name]) for row in rows if row.get(name)]
        assert len(values) >= count and all(math.isfinite(x) and 0 < x < 9 for x in values), (name, values)
