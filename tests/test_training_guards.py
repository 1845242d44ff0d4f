"""A diverged run stops with one line and keeps a checkpoint worth resuming from; checkpoint saves are atomic,
in their own folder, and a full disk stops the run in one line."""

import shutil
from collections import namedtuple

import lightning as L
import pytest
import torch

from commands import one_error_line, train_tiny_checkpointing

from sparse_transformer.data.text import ByteTextDataModule
from sparse_transformer.errors import InputError
from sparse_transformer.model import AttentionPattern, ModelConfig, Sparse
from sparse_transformer.training.checkpoint_io import AtomicCheckpointIO, NotFinite, verify
from sparse_transformer.training.checkpointing import CheckpointSchedule, RunCheckpoint
from sparse_transformer.training.run import Run
from sparse_transformer.training.divergence_guard import Diverged, DivergenceGuard
from sparse_transformer.training.finite import tensors_of
from sparse_transformer.training.lightning_module import SparseTransformerLM
from sparse_transformer.training.sample_logger import SampleLogger

NETWORK = ModelConfig(seq_len=32, d_model=16, n_layers=1, n_heads=2, pattern=AttentionPattern("dense", block_size=8), attention=Sparse("blocks"))


class DivergesAtStep3(SparseTransformerLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 3 else loss


class ValidationExplodesAfterStep2(SparseTransformerLM):
    def validation_step(self, batch, batch_idx):
        self.log("val_bpb", 7.0 if self.global_step <= 2 else 1.3e8)


def fit(tmp_path, module, max_steps=8, val_every=None, ckpt_path=None, callbacks=(), **checkpointing):
    """Train in the run folder ``tmp_path``; checkpoints go to ``tmp_path / "checkpoints"``."""
    checkpoint = RunCheckpoint(Run(tmp_path, ckpt_path), "val_bpb", CheckpointSchedule(**checkpointing))
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, callbacks=[*callbacks, DivergenceGuard(checkpoint), checkpoint], plugins=[AtomicCheckpointIO()], logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2 if val_every else 0,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1, accelerator="cpu",
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, ByteTextDataModule(seq_len=32, batch_size=2, samples_per_epoch=20), ckpt_path=ckpt_path)
    return trainer


def test_non_finite_loss_stops_before_the_broken_weights_are_saved(tmp_path, one_thread):
    with pytest.raises(Diverged, match=r"training loss is nan at step 4; stopped before saving it \(last good checkpoint: .*last.ckpt \(step 3\)\)"):
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


class NaNGradientAtStep3(SparseTransformerLM):
    """The loss of step 3 is finite; one element of one gradient is not, so the update makes weights NaN."""

    def on_before_optimizer_step(self, optimizer):
        if self.global_step == 3:
            self.model.head.weight.grad[0, 0] = float("nan")


def every_checkpoint_is_finite(folder) -> list[str]:
    """The names of the checkpoints on disk, after checking that every tensor in each is finite and its seal holds."""
    names = []
    for path in sorted(folder.rglob("*.ckpt")):
        assert verify(path), path
        state = torch.load(path, weights_only=True)
        tensors = [t for part in ("state_dict", "optimizer_states") for _, t in tensors_of(state[part])]
        assert tensors and all(t.isfinite().all() for t in tensors if t.is_floating_point()), path
        names.append(f"{path.name}@{state['global_step']}")
    return names


def test_a_nan_gradient_before_a_scheduled_save_never_reaches_a_checkpoint(tmp_path, one_thread):
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(Diverged, match=rf"the weights hold nan \(.*\) at step 4; stopped before saving them \(last good checkpoint: {last} \(step 2\)\)"):
        fit(tmp_path, NaNGradientAtStep3(NETWORK), every_n_train_steps=2)
    assert every_checkpoint_is_finite(tmp_path) == ["last.ckpt@2"]


def test_a_nan_gradient_before_a_validation_is_stopped_there_and_samples_nothing(tmp_path, one_thread):
    """Validation after the poisoned update: the metric is NaN; sampling is skipped, not a traceback; the guard stops."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(Diverged, match=rf"validation val_bpb is nan at step 4; stopped before saving it \(last good checkpoint: {last} \(step 2\)\)"):
        fit(tmp_path, NaNGradientAtStep3(NETWORK), val_every=2, callbacks=[SampleLogger(num_samples=1, length=8)])
    assert [name.split("-")[0] for name in every_checkpoint_is_finite(tmp_path)] == ["last.ckpt@2", "step=2"]
    assert not (tmp_path / "samples" / "step=4").exists()


def test_the_writer_refuses_weights_that_are_not_finite_whoever_saves(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "hpc_ckpt_1.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    good = path.read_bytes()
    bad = {"state_dict": {"w": torch.ones(3)}, "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([0.0, float("inf")])}}}]}
    with pytest.raises(NotFinite, match=rf"not saving {path}: optimizer_states.0.state.0.exp_avg holds inf at step None \(the weights diverged; the previous hpc_ckpt_1.ckpt is intact\)"):
        io.save_checkpoint(bad, path)
    assert path.read_bytes() == good
    with pytest.raises(NotFinite, match=r"no other.ckpt was written"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor(float("nan"))}}, tmp_path / "other.ckpt")


def test_no_space_for_a_best_checkpoint_that_never_existed_does_not_call_it_intact(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(InputError, match=r"for step=3-val_bpb=7.000.ckpt: .* \(no step=3-val_bpb=7.000.ckpt was written\)"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, tmp_path / "step=3-val_bpb=7.000.ckpt")


def test_no_space_during_a_run_names_the_last_good_checkpoint(tmp_path, one_thread, monkeypatch):
    """The first best checkpoint does not fit: the line names last.ckpt, which exists, not the one never written."""

    class DiskFullsAfterStep2(SparseTransformerLM):
        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == 2:
                usage = namedtuple("usage", "total used free")
                monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 100, 100))

    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(InputError, match=rf"no space left .* \(no step=3-.*ckpt was written\); .* \(last good checkpoint: {last} \(step 2\)\)"):
        fit(tmp_path, DiskFullsAfterStep2(NETWORK), val_every=3, every_n_train_steps=2)


@pytest.mark.slow
def test_through_the_cli_a_nan_gradient_is_one_line_and_no_file_on_disk_holds_it(tmp_path):
    result = train_tiny_checkpointing(tmp_path, "", "--trainer.callbacks+=tests.killer.NaNGradientAtStep", "--trainer.callbacks.step=3")
    last = tmp_path / "checkpoints" / "last.ckpt"
    error = one_error_line(result)
    assert error.startswith("error: the weights hold nan (") and error.endswith(
        f") at step 4; stopped before saving them (last good checkpoint: {last} (step 3)); resume from it with a lower "
        "--model.lr or a more stable precision"
    )
    assert [name.split("-")[0] for name in every_checkpoint_is_finite(tmp_path)] == ["last.ckpt@3", "step=3"]
    assert not (tmp_path / "run.lock").exists()
