"""Each attention variant's tiny config trains a few steps through the real CLI and samples from its checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config,attention", [("tiny_performer", "performer"), ("tiny_adaptive_span", "adaptive_span")])
def test_variant_trains_and_samples(config, attention, tmp_path):
    fit = run("train.py", "fit", "--config", f"configs/{config}.yaml", "--trainer.default_root_dir", str(tmp_path))
    assert fit.returncode == 0, fit.stderr[-3000:]
    (ckpt,) = tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6 and state["hyper_parameters"]["attention"] == attention
    sample = run("sample.py", "--ckpt", str(ckpt), "--length", "24", "--prompt", "The ", "--out", str(tmp_path / "s"))
    assert sample.returncode == 0, sample.stderr[-3000:]
    data = (tmp_path / "s" / "sample_0.txt").read_bytes()
    assert data.startswith(b"The ") and len(data) == 28
