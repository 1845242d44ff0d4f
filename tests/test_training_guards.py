"""A diverged run stops with one line and keeps its last good checkpoint; checkpoint saves are atomic."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sparse_transformer.data.text import ByteTextDataModule
from sparse_transformer.training.loss_guard import NonFiniteLoss, NonFiniteLossGuard
from sparse_transformer.training.checkpoint_io import AtomicCheckpointIO
from sparse_transformer.training.lightning_module import SparseTransformerLM
from sparse_transformer.model import AttentionPattern, ModelConfig


class DivergesAtStep3(SparseTransformerLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 3 else loss


def test_non_finite_loss_stops_before_the_broken_weights_are_saved(tmp_path):
    pattern = AttentionPattern("dense", block_size=8)
    module = DivergesAtStep3(ModelConfig(seq_len=32, d_model=16, n_layers=1, n_heads=2, pattern=pattern, backend="blocks"))
    data = ByteTextDataModule(seq_len=32, batch_size=2, samples_per_epoch=20)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(
        max_steps=8, callbacks=[NonFiniteLossGuard(), ckpt], plugins=[AtomicCheckpointIO()], logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
    )
    with pytest.raises(NonFiniteLoss, match=r"training loss is nan at step 4; stopped before saving it \(last good checkpoint: .*last.ckpt\)"):
        trainer.fit(module, data)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3
    assert all(t.isfinite().all() for t in state["state_dict"].values())


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
