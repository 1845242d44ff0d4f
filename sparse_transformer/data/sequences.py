"""What every DataModule here shares: sequences of ``[N + 1]`` tokens, a resumable training sampler, and
validation / test read in order.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from sparse_transformer.data.training_order import ResumableTraining


class SequenceDataModule(ResumableTraining, L.LightningDataModule):
    """Base for the text, image and audio DataModules.

    Subclasses set ``self.train``, ``self.val``, ``self.test`` in ``setup`` and ``batch_size``,
    ``samples_per_epoch``, ``num_workers``, ``seed`` in ``__init__``; ``epoch_size`` says how many training
    samples make an epoch when ``samples_per_epoch`` is None.
    """

    batch_size: int
    samples_per_epoch: int | None
    num_workers: int
    seed: int
    train: Dataset
    val: Dataset
    test: Dataset

    def epoch_size(self) -> int:
        return len(self.train)

    def train_dataloader(self) -> DataLoader:
        n = self.samples_per_epoch or max(self.epoch_size(), self.batch_size)
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
