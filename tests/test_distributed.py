"""Data parallel training through the real CLI: DDP with 2 CPU processes (gloo); the FSDP overlay's CPU refusal."""

import csv

import pytest
import torch

import train
from commands import ROOT, train_tiny_checkpointing
from sparse_transformer.errors import run_cli



@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    result = train_tiny_checkpointing(tmp_path, "  strategy: ddp\n  devices: 2\n  max_steps: 4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout

    # Written once, by rank 0: no second copy (last-v1.ckpt), no temporary left behind.
    last, best = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert best.startswith("step=3-val_bpb=") and last == "last.ckpt"
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    # 4 steps of 4 windows on each of 2 ranks: the sampler's position counts both ranks' windows.
    assert state["ByteTextDataModule"] == {"train_sampler": {"epoch": 0, "consumed": 32}}
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["train_bpb_step"]] == [0, 1, 2, 3]
    assert any(r["val_bpb"] for r in rows)


def test_fsdp_overlay_parses_and_cpu_is_refused_in_one_line(capsys):
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / "configs/strategies/fsdp.yaml")]
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: train.main(args))
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: trainer: The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`. "
        "Please set `accelerator='cuda'`, `accelerator='gpu'`, or pass a `CUDAAccelerator()` instance to use FSDP."
    )
