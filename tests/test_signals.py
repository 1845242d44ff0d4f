"""SIGTERM and SIGINT through the real CLI at every phase of a run: start-up, the sanity check, training,
validation, sampling at validation and the final save stop within one step or validation batch with 128 + the
signal's number and one ``stopped:`` line, saving last.ckpt where there is training to keep; a second signal
stops at once and leaves the last checkpoint whole; under DDP a signal to one rank stops both at the same step;
resuming continues."""

import signal

import pytest
import torch

from commands import train_tiny_checkpointing
from sparse_transformer.training.checkpoint_io import verify

pytestmark = pytest.mark.slow


def signalled(tmp_path, name: str, trainer_options: str = "  max_steps: 40", rank: int = 0):
    args = ["--trainer.callbacks+=tests.killer.SignalAtStep", "--trainer.callbacks.step=5"]
    args += [f"--trainer.callbacks.signal={name}", f"--trainer.callbacks.rank={rank}"]
    return train_tiny_checkpointing(tmp_path, trainer_options, *args)


def signalled_in(tmp_path, phase: str, *args: str, step: int = 0, name: str = "SIGTERM", twice: bool = False, options: str = ""):
    """tiny.yaml (6 steps, validation at steps 3 and 6, last.ckpt every 2 steps) signalled in ``phase`` (killer.SignalIn)."""
    kill = ["--trainer.callbacks+=tests.killer.SignalIn", f"--trainer.callbacks.phase={phase}", f"--trainer.callbacks.step={step}"]
    kill += [f"--trainer.callbacks.signal={name}", f"--trainer.callbacks.twice={twice}"]
    return train_tiny_checkpointing(tmp_path, options, *kill, *args)


def stopped_line(result, status: int) -> str:
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(("stopped:", "error:"))]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def step_of(path) -> int:
    assert verify(path)
    return torch.load(path, weights_only=False)["global_step"]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_next_step_and_exits_non_zero(tmp_path, name):
    result = signalled(tmp_path, name)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert stopped_line(result, 128 + getattr(signal, name)) == f"stopped: {name} at step 6; saved {last} (resume with --ckpt_path last)"
    assert step_of(last) == 6  # the step in progress, finished and saved
    assert not (tmp_path / "samples" / "step=6").exists()  # the validation step 6 would have started is skipped

    resumed = train_tiny_checkpointing(tmp_path, "  max_steps: 8", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_of(last) == 8


@pytest.mark.parametrize("phase", ["setup", "sanity"])
def test_before_training_a_signal_stops_at_once_and_saves_nothing(tmp_path, phase):
    result = signalled_in(tmp_path, phase, options="  num_sanity_val_steps: 1")
    if phase == "setup":
        assert stopped_line(result, 143) == "stopped: SIGTERM during start-up; nothing was written"
        assert not any(tmp_path.iterdir())  # nothing in the run folder, not even the lock
    else:  # the start checks passed: the logs and config.yaml are there
        assert stopped_line(result, 143) == "stopped: SIGTERM before training started; no checkpoint was written"
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "run.lock").exists()


def test_a_signal_during_validation_stops_after_the_batch_and_the_run_resumes(tmp_path):
    result = signalled_in(tmp_path, "validation", step=3)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert stopped_line(result, 143) == f"stopped: SIGTERM at step 3 during validation; saved {last} (resume with --ckpt_path last)"
    assert step_of(last) == 3 and not (tmp_path / "samples").exists()
    resumed = train_tiny_checkpointing(tmp_path, "", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_of(last) == 6


def test_a_signal_during_sampling_stops_generation_at_the_next_token(tmp_path):
    """Samples a million tokens long would take minutes: the run stops at once, writing no samples."""
    result = signalled_in(tmp_path, "sampling", "--samples.length", "1000000", step=3, name="SIGINT")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert stopped_line(result, 130) == f"stopped: SIGINT at step 3 during validation; saved {last} (resume with --ckpt_path last)"
    assert step_of(last) == 3 and not (tmp_path / "samples").exists()
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints").glob("step=*")] == ["step=3"]  # the validation was whole


def test_a_signal_during_the_final_save_lets_it_finish(tmp_path):
    result = signalled_in(tmp_path, "end")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert stopped_line(result, 143) == f"stopped: SIGTERM at the end of training; last good checkpoint: {last} (step 6)"
    assert step_of(last) == 6


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    result = signalled_in(tmp_path, "train", step=5, name="SIGINT", twice=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert stopped_line(result, 130) == f"stopped: SIGINT again: stopped at once (last good checkpoint: {last} (step 4))"
    assert step_of(last) == 4
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "run.lock").exists()


def test_under_ddp_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    result = signalled(tmp_path, "SIGTERM", "  max_steps: 40\n  strategy: ddp\n  devices: 2", rank=1)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert stopped_line(result, 143) == f"stopped: SIGTERM at step 6; saved {last} (resume with --ckpt_path last)"
    assert "Error" not in result.stderr
    assert step_of(last) == 6
