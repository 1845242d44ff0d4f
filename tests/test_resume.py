"""Resuming continues the same run: same step, optimizer, schedule and data position, even after kill -9."""

import csv
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from commands import train_tiny_checkpointing
from sparse_transformer.data.training_order import ResumableSampler
from sparse_transformer.data.text import ByteTextDataModule
from sparse_transformer.training.lightning_module import SparseTransformerLM
from sparse_transformer.model import AttentionPattern, ModelConfig, Sparse



def test_sampler_order_is_fixed_by_seed_and_epoch_and_shards_cover_it():
    whole = list(ResumableSampler(1000, 24, seed=3))
    assert whole == list(ResumableSampler(1000, 24, seed=3)) and len(whole) == 24
    later = ResumableSampler(1000, 24, seed=3)
    later.set_epoch(1)
    assert list(later) != whole
    ranks = [list(ResumableSampler(1000, 24, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [i for pair in zip(*ranks) for i in pair] == whole  # rank r takes every other index


def test_sampler_skips_what_was_consumed_even_on_another_number_of_devices():
    whole = list(ResumableSampler(50, 24, seed=0, replacement=False))
    assert len(set(whole)) == 24  # a permutation
    resumed = ResumableSampler(50, 24, seed=0, replacement=False, num_replicas=3, rank=1)
    resumed.load_state_dict({"epoch": 0, "consumed": 6})
    assert list(resumed) == whole[6:][1::3]
    resumed.set_epoch(0)  # Lightning's call for the epoch it resumed (made once its iterator started)
    resumed.set_epoch(1)  # the skip belongs to the resumed epoch only
    assert len(list(resumed)) == 8
    longer = ResumableSampler(50, 24, seed=0, replacement=False)
    longer.load_state_dict({"epoch": 0, "consumed": 6})
    longer.set_epoch(1)  # a run stopped at max_steps: Lightning counted epoch 0 done and begins 1
    assert list(longer) == whole[6:] and longer.state_dict(consumed=4) == {"epoch": 0, "consumed": 10, "start": 6, "behind": 1}
    longer.set_epoch(2)  # then its order's epoch 1, one behind Lightning's
    epoch_1 = ResumableSampler(50, 24, seed=0, replacement=False)
    epoch_1.set_epoch(1)
    assert list(longer) == list(epoch_1)
    at_end = ResumableSampler(50, 24, seed=0)
    at_end.load_state_dict({"epoch": 2, "consumed": 24})
    assert (at_end.epoch, at_end.skip) == (3, 0)


class Crash(Exception):
    pass


class Recorder(L.Callback):
    """Records (step, first window start) for each training batch; optionally crashes before ``crash_at``."""

    def __init__(self, crash_at: int | None = None):
        self.seen, self.crash_at = [], crash_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.crash_at:
            raise Crash
        self.seen.append((trainer.global_step, batch[:, :4].tolist()))


def fit(tmp_path, recorder, num_workers=0, ckpt_path=None, max_steps=12):
    L.seed_everything(0)
    pattern = AttentionPattern("dense", block_size=8)
    module = SparseTransformerLM(ModelConfig(seq_len=16, d_model=16, n_layers=1, n_heads=2, pattern=pattern, attention=Sparse("blocks")))
    data = ByteTextDataModule(seq_len=16, batch_size=2, samples_per_epoch=8, num_workers=num_workers)  # 4 steps/epoch
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[
            recorder,
            ModelCheckpoint(tmp_path, every_n_train_steps=2, save_last=True),
        ],
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize(
    "crash_at,num_workers",
    [(3, 0), (5, 0), (7, 2)],
    ids=["epoch0", "epoch-end", "epoch1-workers"],
)
def test_resumed_run_sees_the_batches_an_uninterrupted_run_sees(tmp_path, crash_at, num_workers, one_thread):
    whole = Recorder()
    _, reference = fit(tmp_path / "whole", whole)
    first, then = Recorder(crash_at), Recorder()
    with pytest.raises(Crash):
        fit(tmp_path / "run", first)
    trainer, resumed = fit(
        tmp_path / "run",
        then,
        num_workers,
        ckpt_path=str(tmp_path / "run" / "last.ckpt"),
    )
    saved = crash_at - crash_at % 2  # checkpoints every 2 steps
    assert [step for step, _ in then.seen] == list(range(saved, 12))  # no step repeated or lost
    assert first.seen[:saved] + then.seen == whole.seen
    assert trainer.global_step == 12
    torch.testing.assert_close(resumed.state_dict(), reference.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("stop_at", [6, 4], ids=["mid-epoch", "epoch-end"])
def test_a_finished_run_trained_longer_sees_the_batches_an_uninterrupted_run_sees(tmp_path, stop_at, one_thread):
    """A run that reached its max_steps, resumed with more: Lightning counts the epoch it stopped in as done, yet the
    rest of that epoch's order comes first, as in a run that never stopped."""
    whole = Recorder()
    _, reference = fit(tmp_path / "whole", whole)
    first, then = Recorder(), Recorder()
    fit(tmp_path / "run", first, max_steps=stop_at)
    trainer, longer = fit(tmp_path / "run", then, ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    assert first.seen + then.seen == whole.seen
    assert trainer.global_step == 12
    torch.testing.assert_close(longer.state_dict(), reference.state_dict(), rtol=0, atol=0)


def train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """tiny.yaml for 10 steps (8 per epoch), a checkpoint every 2 steps in a fixed folder, metrics to CSV."""
    tmp_path.mkdir(exist_ok=True)
    return train_tiny_checkpointing(tmp_path, "  max_steps: 10", *args)


def logged_losses(csv_dir: Path) -> dict[int, str]:
    with (csv_dir / "metrics.csv").open() as f:
        return {int(row["step"]): row["train_bpb_step"] for row in csv.DictReader(f) if row["train_bpb_step"]}


@pytest.mark.slow
def test_kill_9_then_resume_from_last_matches_an_uninterrupted_run(tmp_path):
    whole = train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    crashed = train(
        tmp_path / "run",
        "--trainer.callbacks+=tests.killer.KillAtStep",
        "--trainer.callbacks.step=7",
    )
    assert crashed.returncode == -9  # killed after the checkpoint of step 6, one step into the next
    resumed = train(tmp_path / "run", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = logged_losses(tmp_path / "whole" / "csv" / "version_0")
    after_resume = logged_losses(tmp_path / "run" / "csv" / "version_1")  # the killed run never flushed its log
    assert sorted(after_resume) == [
        6,
        7,
        8,
        9,
    ]  # continues at step 6: nothing repeated, nothing lost
    assert after_resume == {step: expected[step] for step in after_resume}
    final = [torch.load(p / "checkpoints" / "last.ckpt", weights_only=True) for p in (tmp_path / "whole", tmp_path / "run")]
    assert final[0]["global_step"] == final[1]["global_step"] == 10
    torch.testing.assert_close(final[1]["state_dict"], final[0]["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(final[1]["optimizer_states"], final[0]["optimizer_states"], rtol=0, atol=0)


@pytest.mark.slow
def test_kill_9_of_a_run_whose_validation_stopped_improving_resumes_within_one_save_interval(tmp_path):
    """Validation is best at step 3 and worse ever after; last.ckpt still follows every 2 steps."""
    worse = ["--trainer.callbacks+=tests.killer.NoBetterValidation", "--trainer.callbacks+=tests.killer.KillAtStep"]
    crashed = train(tmp_path / "run", *worse, "--trainer.callbacks.step=8")
    assert crashed.returncode == -9
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints[0] == "last.ckpt" and checkpoints[1].startswith("step=3-val_bpb=")  # best: the first validation
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    resumed = train(tmp_path / "run", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(logged_losses(tmp_path / "run" / "csv" / "version_1")) == [8, 9]  # no step lost since the last save


@pytest.mark.slow
def test_a_finished_run_made_longer_through_the_cli_matches_one_that_ran_as_long(tmp_path):
    """train.py's last.ckpt of a run at its max_steps is saved after Lightning counted the epoch done (8 steps an
    epoch, stopped at 2); made longer to 4 steps it must still train on the rest of that epoch's windows."""
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert train_tiny_checkpointing(whole, "  max_steps: 4").returncode == 0
    assert train_tiny_checkpointing(run, "  max_steps: 2").returncode == 0
    longer = train_tiny_checkpointing(run, "  max_steps: 4", "--ckpt_path", "last")
    assert longer.returncode == 0, longer.stderr[-2000:]
    a, b = (torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True) for folder in (whole, run))
    assert a["ByteTextDataModule"]["train_sampler"]["consumed"] == b["ByteTextDataModule"]["train_sampler"]["consumed"] == 16
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=0, msg=name)
