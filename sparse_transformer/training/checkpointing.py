"""The run's checkpoints in ``<run folder>/checkpoints``: ``last.ckpt``, always the latest state, and the best
``save_top_k`` by the validation metric, each recording what makes its run.

Lightning's ModelCheckpoint writes ``last.ckpt`` only when it also writes a top-k file; with a monitored
metric that stops improving, ``last.ckpt`` would stay at an old step and a resumed run would silently lose
everything since. Here ``last.ckpt`` is written on its own schedule, whatever the metric does.

Every file is written by ``checkpoint_io.AtomicCheckpointIO``, which refuses weights that are not finite and
seals what it writes; so the checkpoint this callback last wrote, or the one the run resumed from (verified),
is one that really is good (:attr:`RunCheckpoint.good`), and every message that sends the user back to a
checkpoint names that one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from sparse_transformer.files import TEMPORARY_SUFFIX, check_room
from sparse_transformer.training.checkpoint_io import NoSpace, NotFinite
from sparse_transformer.training.finite import Diverged
from sparse_transformer.training.resume import check_resumable, data_record, resume_line, run_identity
from sparse_transformer.training.run import Run


@dataclass(frozen=True)
class CheckpointSchedule:
    """How often and how many (``checkpoint:`` in a config).

    Args:
        every_n_train_steps: save ``last.ckpt`` every this many training steps (None: at validations and the
            end only); a kill loses at most this many steps.
        save_top_k: best checkpoints kept by the validation metric (0: none, only last.ckpt).
    """

    every_n_train_steps: int | None = None
    save_top_k: int = 1


class RunCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``schedule.every_n_train_steps`` steps, after every validation and when training ends;
    and ``step=<step>-<metric>=<value>.ckpt`` for the best ``save_top_k`` validations (Lightning's ModelCheckpoint),
    in the run's folder, ranked by ``monitor`` (``val_bpb`` for text, ``val_bpd`` for images and audio).

    Before training it removes temporary files a killed save left behind, and refuses to resume from a
    checkpoint of another run (``resume.py``); every checkpoint it writes records this run's identity and the
    data it trained on (``sample.py`` rebuilds the validation split from it).
    """

    def __init__(self, run: Run, monitor: str, schedule: CheckpointSchedule = CheckpointSchedule()):
        super().__init__(
            dirpath=str(run.checkpoints),
            filename=f"step={{step}}-{monitor}={{{monitor}:.3f}}",
            monitor=monitor,
            mode="min",
            save_top_k=schedule.save_top_k,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        self.run, self.last_every = run, schedule.every_n_train_steps
        self.last_saved_step: int | None = None
        self.good: Path | None = None  # the newest checkpoint known good: written here, or resumed from
        self.good_step: int | None = None
        self.identity: dict[str, Any] | None = None
        self.data: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if trainer.is_global_zero:
            for stale in self.run.checkpoints.glob(f".*{TEMPORARY_SUFFIX}"):
                stale.unlink(missing_ok=True)  # a save that a kill interrupted
        # After the DataModule's setup, so the identity covers the data's files.
        self.identity = run_identity(pl_module, trainer.datamodule, self.run.seed)
        self.data = data_record(trainer.datamodule)
        if self.run.resume_from and self.run.resume_from not in ("best", "hpc"):
            saved = check_resumable(self.run.resume_from, pl_module, self.identity)
            self.good, self.good_step = Path(self.run.resume_from), saved.get("global_step")
            rank_zero_info(resume_line(self.run.resume_from, saved, self.identity))

    def check_room(self, module: L.LightningModule) -> None:
        """Refuse a run folder without room for one checkpoint of ``module``, before anything is written (the
        run lock has checked that the folder is there and writable)."""
        weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        trained = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        check_room(self.run.folder, "run folder", weights + 2 * trained, needs="one checkpoint (weights and AdamW state)")

    def describe_good(self) -> str:
        """The checkpoint to go back to, for messages: ``runs/x/checkpoints/last.ckpt (step 40)``, or "none yet"."""
        if self.good is None:
            return "none yet"
        return f"{self.good}" + (f" (step {self.good_step})" if self.good_step is not None else "")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.identity is not None:
            checkpoint["run"] = self.identity
        if self.data is not None:
            checkpoint["data"] = self.data
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def write_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` with the trainer's current state (on every rank: the save is collective)."""
        if trainer.sanity_checking or trainer.fast_dev_run or self.last_saved_step == trainer.global_step:
            return
        self.last_model_path = str(self.run.last)  # before saving: it is part of the saved state
        with self._refusals():
            trainer.save_checkpoint(self.run.last, weights_only=False)
        self.last_saved_step = trainer.global_step
        self.good, self.good_step = self.run.last, trainer.global_step

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """ModelCheckpoint's save of a best checkpoint, with the same refusals as last.ckpt's."""
        with self._refusals():
            super()._save_checkpoint(trainer, filepath)
        if self.good_step != trainer.global_step:  # of two of one step, name last.ckpt: the one a resume takes
            self.good, self.good_step = Path(filepath), trainer.global_step

    @contextmanager
    def _refusals(self) -> Iterator[None]:
        """A save the writer refused (weights not finite, no room) stops the run naming the checkpoint to go back to."""
        try:
            yield
        except NotFinite as e:
            raise Diverged(
                f"the weights hold {e.value} ({e.name}) at step {e.step}; stopped before saving them (last good "
                f"checkpoint: {self.describe_good()}); resume from it with a lower --model.lr or a more stable precision"
            ) from e
        except NoSpace as e:
            raise NoSpace(f"{e} (last good checkpoint: {self.describe_good()})") from e

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
