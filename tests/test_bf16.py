"""bf16 on the CPU: every CPU backend (cpp, pieces, blocks, reference) within bf16 tolerances of the fp32 oracle,
forward and backward, on each pattern, under autocast and under bf16-true's default dtype; and training through
train.py in bf16-mixed. The Triton
interpreter is left out: it is silently wrong in bf16 (its bf16 tests run on a GPU, test_kernel_triton.py)."""

import csv
import math

import oracle
import pytest
import torch
from commands import run

from sparse_transformer.model.kernels import get_backend
from sparse_transformer.model.patterns import AttentionPattern

TOLERANCE = 2e-2  # of the reference's max |value|: bf16 keeps 8 bits of mantissa
PATTERNS = [
    AttentionPattern("strided", block_size=16, stride=64, heads="split"),
    AttentionPattern("fixed", block_size=16, stride=64, summary=16, heads="merged"),
    AttentionPattern("local", block_size=16, stride=32),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.kind}-{p.heads}")
@pytest.mark.parametrize("backend", ["cpp", "pieces", "blocks", "reference"])
def test_bf16_matches_the_fp32_oracle(backend, pattern):
    layout = pattern.layout(4, 256, layer=1)
    oracle.check_against_reference(get_backend(backend, torch.device("cpu")), layout, 16, torch.bfloat16, TOLERANCE)


@pytest.mark.parametrize("backend", ["cpp", "pieces"])
def test_bf16_autocast_gives_bf16_attention_and_finite_gradients(backend):
    """Under autocast, as bf16-mixed trains, the linear layers hand the backend bf16 q, k, v."""
    layout = PATTERNS[0].layout(2, 128)
    linear = torch.nn.Linear(16, 3 * 16)
    x = torch.randn(2, 128, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = linear(x).view(2, 128, 3, 1, 16).expand(-1, -1, -1, 2, -1).unbind(2)
        out = get_backend(backend, torch.device("cpu"))(*(t.transpose(1, 2) for t in (q, k, v)), layout, 16)
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
        oracle.check_against_reference(get_backend(backend, torch.device("cpu")), layout, 16, torch.bfloat16, TOLERANCE)
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
