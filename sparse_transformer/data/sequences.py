"""What every DataModule here shares: sequences of ``[N + 1]`` tokens, a resumable training sampler, and
validation / test read in order.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from sparse_transformer.data.training_order import ResumableTraining
from sparse_transformer.errors import InputError


class SequenceDataModule(ResumableTraining, L.LightningDataModule):
    """Base for the text, image and audio DataModules.

    Subclasses pass the loading options below to ``__init__``, call ``save_hyperparameters`` (the checkpoint
    records them, so sampling can rebuild the data and a resumed run can check it is the same), and set
    ``self.train``, ``self.val``, ``self.test`` in ``setup``; ``epoch_size`` says how many training samples
    make an epoch when ``samples_per_epoch`` is None, and ``fingerprint`` what identifies their files.

    Args:
        batch_size: sequences per batch (per device).
        samples_per_epoch: training sequences per epoch over all devices; None is one pass worth.
        num_workers: DataLoader worker processes.
        seed: seeds the training order (and any split), so a run's batches are reproducible and resumable.
    """

    train: Dataset
    val: Dataset
    test: Dataset

    def __init__(self, batch_size: int, samples_per_epoch: int | None, num_workers: int, seed: int):
        super().__init__()
        if batch_size < 1:
            raise InputError(f"data batch_size={batch_size} must be >= 1")
        if samples_per_epoch is not None and samples_per_epoch < batch_size:
            raise InputError(
                f"data samples_per_epoch={samples_per_epoch} is less than one batch of batch_size={batch_size}; "
                "an epoch would train nothing"
            )
        if num_workers < 0:
            raise InputError(f"data num_workers={num_workers} must be >= 0")
        self.batch_size, self.samples_per_epoch, self.num_workers, self.seed = batch_size, samples_per_epoch, num_workers, seed

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data's files beyond the options (sizes, a hash), for telling runs apart."""
        return {}

    def epoch_size(self) -> int:
        return len(self.train)

    def train_dataloader(self) -> DataLoader:
        n = self.samples_per_epoch or max(self.epoch_size(), self.batch_size)
        devices = self.trainer.world_size if self.trainer else 1
        if n // devices < self.batch_size:
            raise InputError(
                f"data samples_per_epoch={n} gives no whole batch of {self.batch_size} on each of {devices} devices; "
                f"use at least {self.batch_size * devices}"
            )
        return self._loader(self.train, sampler=self.resumable_sampler(len(self.train), n), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test)

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )


def files_fingerprint(files: list[Path], root: Path, contents: bool = False) -> dict[str, Any]:
    """How many files, and a hash of their names (relative to ``root``, as the file system spells them) and sizes:
    a folder that gained, lost or resized a file no longer matches. With ``contents``, also a hash of every byte
    of them, for data read whole anyway (audio)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.fsencode(path.relative_to(root)) + f"\t{path.stat().st_size}\n".encode())
    fingerprint = {"files": len(files), "files_sha256": digest.hexdigest()[:16]}
    if contents:
        digest = hashlib.sha256()
        for path in files:
            with path.open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        fingerprint["contents_sha256"] = digest.hexdigest()[:16]
    return fingerprint
