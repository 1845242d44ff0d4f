"""A diverged run stops with one line and keeps a checkpoint worth resuming from; checkpoint saves are atomic,
in their own folder, and a full disk stops the run in one line."""

import shutil
from collections import namedtuple

import lightning as L
import pytest
import torch

from sparse_transformer.data.text import ByteTextDataModule
from sparse_transformer.errors import InputError
from sparse_transformer.model import AttentionPattern, ModelConfig, Sparse
from sparse_transformer.training.checkpoint_io import AtomicCheckpointIO
from sparse_transformer.training.checkpointing import CheckpointSchedule, RunCheckpoint
from sparse_transformer.training.run import Run
from sparse_transformer.training.divergence_guard import Diverged, DivergenceGuard
from sparse_transformer.training.lightning_module import SparseTransformerLM

NETWORK = ModelConfig(seq_len=32, d_model=16, n_layers=1, n_heads=2, pattern=AttentionPattern("dense", block_size=8), attention=Sparse("blocks"))


class DivergesAtStep3(SparseTransformerLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 3 else loss


class ValidationExplodesAfterStep2(SparseTransformerLM):
    def validation_step(self, batch, batch_idx):
        self.log("val_bpb", 7.0 if self.global_step <= 2 else 1.3e8)


def fit(tmp_path, module, max_steps=8, val_every=None, ckpt_path=None, **checkpointing):
    """Train in the run folder ``tmp_path``; checkpoints go to ``tmp_path / "checkpoints"``."""
    checkpoint = RunCheckpoint(Run(tmp_path, ckpt_path), "val_bpb", CheckpointSchedule(**checkpointing))
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=[DivergenceGuard(), checkpoint], plugins=[AtomicCheckpointIO()], logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2 if val_every else 0,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1, accelerator="cpu",
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, ByteTextDataModule(seq_len=32, batch_size=2, samples_per_epoch=20), ckpt_path=ckpt_path)
    return trainer


def test_non_finite_loss_stops_before_the_broken_weights_are_saved(tmp_path, one_thread):
    with pytest.raises(Diverged, match=r"training loss is nan at step 4; stopped before saving it \(last good checkpoint: .*last.ckpt\)"):
        fit(tmp_path, DivergesAtStep3(NETWORK), every_n_train_steps=1)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3
    assert all(t.isfinite().all() for t in state["state_dict"].values())


def test_an_exploding_validation_is_never_saved(tmp_path, one_thread):
    with pytest.raises(Diverged, match=r"validation val_bpb is 1.3e\+08 bits at step 4; stopped before saving it"):
        fit(tmp_path, ValidationExplodesAfterStep2(NETWORK), val_every=2)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2  # the validation before
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints").glob("step=*")] == ["step=2"]


def test_last_is_the_latest_state_whatever_the_metric_does(tmp_path, one_thread):
    """Validation never improves after the first: last.ckpt still follows every save, and the end of the run."""

    class Worsening(SparseTransformerLM):
        def validation_step(self, batch, batch_idx):
            self.log("val_bpb", 1.0 + self.global_step)

    trainer = fit(tmp_path, Worsening(NETWORK), max_steps=7, val_every=2, every_n_train_steps=3)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert [p.name for p in (tmp_path / "checkpoints").glob("step=*")] == ["step=2-val_bpb=3.000.ckpt"]
    assert trainer.global_step == 7


def test_the_lr_may_change_on_resume(tmp_path, one_thread, capsys):
    fit(tmp_path, SparseTransformerLM(NETWORK, lr=1e-3, warmup_steps=0), max_steps=4, every_n_train_steps=2)
    resumed = SparseTransformerLM(NETWORK, lr=2e-4, warmup_steps=0)
    trainer = fit(tmp_path / "resumed", resumed, max_steps=5, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    optimizer = trainer.optimizers[0]
    assert all(group["initial_lr"] == 2e-4 for group in optimizer.param_groups)
    assert 0 < optimizer.param_groups[0]["lr"] < 2e-4  # on the cosine at step 5 of 5, from the new lr


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    monkeypatch.undo()
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() would make it


def test_no_space_left_stops_in_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    good = path.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(InputError, match=rf"no space left in {tmp_path} for last.ckpt: it needs [\d,]+ bytes and 100 are free"):
        io.save_checkpoint({"w": torch.zeros(1000)}, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_killed_saves_temporary_file_is_removed_on_the_next_start(tmp_path, one_thread):
    stale = tmp_path / "checkpoints" / ".last.ckpt.abc123.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    fit(tmp_path, SparseTransformerLM(NETWORK), max_steps=1)
    assert not stale.exists() and (tmp_path / "checkpoints" / "last.ckpt").is_file()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
