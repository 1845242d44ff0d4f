"""SIGTERM and SIGINT through the real CLI: last.ckpt at the next step boundary, one line naming it, exit
128 + the signal's number; under DDP a signal to one rank stops both at the same step; resuming continues."""

import signal

import pytest
import torch

from commands import train_tiny_checkpointing

pytestmark = pytest.mark.slow


def signalled(tmp_path, name: str, trainer_options: str = "  max_steps: 40", rank: int = 0):
    args = ["--trainer.callbacks+=tests.killer.SignalAtStep", "--trainer.callbacks.step=5"]
    args += [f"--trainer.callbacks.signal={name}", f"--trainer.callbacks.rank={rank}"]
    return train_tiny_checkpointing(tmp_path, trainer_options, *args)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_next_step_and_exits_non_zero(tmp_path, name):
    result = signalled(tmp_path, name)
    assert result.returncode == 128 + getattr(signal, name), result.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    stopped = [line for line in result.stderr.splitlines() if line.startswith("stopped:")]
    assert stopped == [f"stopped: {name} at step 6; saved {last} (resume with --ckpt_path last)"]
    assert "Traceback" not in result.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 6  # the step in progress, finished and saved

    resumed = train_tiny_checkpointing(tmp_path, "  max_steps: 8", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 8


def test_under_ddp_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    result = signalled(tmp_path, "SIGTERM", "  max_steps: 40\n  strategy: ddp\n  devices: 2", rank=1)
    assert result.returncode == 143, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("stopped:")] == [
        f"stopped: SIGTERM at step 6; saved {tmp_path / 'checkpoints' / 'last.ckpt'} (resume with --ckpt_path last)"
    ]
    assert "Traceback" not in result.stderr and "Error" not in result.stderr
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
