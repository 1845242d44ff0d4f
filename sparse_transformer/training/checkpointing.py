"""The run's checkpoints in ``<run folder>/checkpoints``: ``last.ckpt``, always the latest state, and the best
``save_top_k`` by the validation metric, each recording what makes its run.

Lightning's ModelCheckpoint writes ``last.ckpt`` only when it also writes a top-k file; with a monitored
metric that stops improving, ``last.ckpt`` would stay at an old step and a resumed run would silently lose
everything since. Here ``last.ckpt`` is written on its own schedule, whatever the metric does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from sparse_transformer.files import TEMPORARY_SUFFIX
from sparse_transformer.training.resume import check_resumable, run_identity
from sparse_transformer.training.run_folder import LAST


class RunCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps, after every validation and when training ends; and
    ``step=<step>-<metric>=<value>.ckpt`` for the best ``save_top_k`` validations (Lightning's ModelCheckpoint).

    ``train.py`` links ``dirpath`` to the run folder and ``monitor`` to the data's metric (``val_bpb`` for text,
    ``val_bpd`` for images and audio), so a config sets only how often and how many (``checkpoint:``), and
    tells it the seed and the checkpoint the run resumes from (``seed``, ``resume_from``).

    Before training it removes temporary files a killed save left behind, and refuses to resume from a
    checkpoint of another run (``resume.py``); every checkpoint it writes records this run's identity.

    Args:
        dirpath: ``<trainer.default_root_dir>/checkpoints``; linked, not set by hand.
        monitor: the validation metric; linked from the data's modality.
        every_n_train_steps: save ``last.ckpt`` every this many training steps (None: at validations and the
            end only); a kill loses at most this many steps.
        save_top_k: best checkpoints kept by the validation metric (0: none, only last.ckpt).
    """

    def __init__(self, dirpath: str, monitor: str, every_n_train_steps: int | None = None, save_top_k: int = 1):
        super().__init__(
            dirpath=dirpath,
            filename=f"step={{step}}-{monitor}={{{monitor}:.3f}}",
            monitor=monitor,
            mode="min",
            save_top_k=save_top_k,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        self.last_every = every_n_train_steps
        self.last_saved_step: int | None = None
        self.seed: int | None = None
        self.resume_from: str | None = None
        self.run: dict[str, Any] | None = None

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / LAST

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if trainer.is_global_zero:
            for stale in Path(self.dirpath).glob(f".*{TEMPORARY_SUFFIX}"):
                stale.unlink(missing_ok=True)  # a save that a kill interrupted
        # After the DataModule's setup, so the identity covers the data's files.
        self.run = run_identity(pl_module, trainer.datamodule, self.seed)
        if self.resume_from and self.resume_from not in ("best", "hpc"):
            check_resumable(self.resume_from, pl_module, self.run)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.run is not None:
            checkpoint["run"] = self.run
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def write_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` with the trainer's current state (on every rank: the save is collective)."""
        if trainer.sanity_checking or trainer.fast_dev_run or self.last_saved_step == trainer.global_step:
            return
        self.last_model_path = str(self.last_path)  # before saving: it is part of the saved state
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self.last_saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if self.last_every and trainer.global_step % self.last_every == 0:
            self.write_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # the best, if this validation is among them
        if trainer.state.fn == "fit":
            self.write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.write_last(trainer)
