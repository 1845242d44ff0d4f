"""A training sampler that resumes where a checkpoint left off, on one device or many.

The order of an epoch is a pure function of (seed, epoch), so a resumed run only needs to know how many
samples of that epoch were consumed to continue with exactly the batches an uninterrupted run would see.
That count is taken from the trainer's own progress when a checkpoint is written, not from the sampler's
iterator, which DataLoader workers and Lightning's prefetching run ahead of training.

A DataModule uses it by inheriting :class:`ResumableTraining` and passing
``sampler=self.resumable_sampler(len(dataset))`` to its training DataLoader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Random indices into ``range(population)``, ``num_samples`` per epoch, sharded over ``num_replicas``.

    A :class:`DistributedSampler`, so Lightning leaves it in place under DDP/FSDP instead of wrapping it:
    every rank draws the same global order and takes every ``num_replicas``-th index of it. Skipping is done
    on the global order, so a run can even resume on a different number of devices.

    Args:
        population: number of items to draw from (the dataset's length).
        num_samples: draws per epoch, over all ranks; None is one pass over the population.
        seed: with the epoch, fixes the order.
        replacement: draw with replacement (cheap for 10^8 text windows) or as a permutation.
    """

    def __init__(
        self,
        population: int,
        num_samples: int | None = None,
        seed: int = 0,
        replacement: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        num_samples = population if num_samples is None else num_samples
        if not replacement and num_samples > population:
            raise ValueError(f"cannot draw {num_samples} samples without replacement from {population}")
        # The parent keeps rank, seed, epoch and the per-rank length (drop_last: every rank the same count).
        super().__init__(
            range(num_samples),
            num_replicas,
            rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.population, self.replacement = population, replacement
        self.skip = 0  # samples of epoch `self.epoch` (global, over all ranks) already trained on
        self.start = 0  # where in this order Lightning's current epoch began (not 0 after a run was made longer)
        self.behind = 0  # Lightning's epoch less this order's: 1 once a run stopped at max_steps was made longer
        self.resumed = False  # loaded from a checkpoint, and Lightning has not begun an epoch since

    def __iter__(self) -> Iterator[int]:
        # Read once: Lightning calls set_epoch after a resumed iterator has already started.
        epoch, skip = self.epoch, self.skip
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.replacement:
            order = torch.randint(self.population, (self.total_size,), generator=generator)
        else:
            order = torch.randperm(self.population, generator=generator)[: self.total_size]
        rest = order[skip:]
        per_rank = len(rest) // self.num_replicas
        return iter(rest[self.rank : per_rank * self.num_replicas : self.num_replicas].tolist())

    def set_epoch(self, epoch: int) -> None:
        """Lightning's epoch ``epoch`` begins: the order of epoch ``epoch - behind`` from its start, or, after a
        resume, from where the checkpoint left it. Lightning resumes an epoch it stopped in by a kill; one a run
        ended at its max_steps it counts as done, and a run made longer begins the next. The rest of the order it
        was in comes first all the same, as in a run that never stopped, and the orders stay one epoch behind."""
        if self.resumed:
            self.resumed = False
            if epoch != self.epoch + self.behind and self.skip < self.total_size:
                self.behind, self.start = epoch - self.epoch, self.skip
                return
        if epoch - self.behind != self.epoch:
            self.skip = self.start = 0
        super().set_epoch(epoch - self.behind)

    def state_dict(self, consumed: int) -> dict[str, int]:
        """The position after ``consumed`` samples (over all ranks) of Lightning's current epoch."""
        return {"epoch": self.epoch, "consumed": self.start + consumed, "start": self.start, "behind": self.behind}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.skip, self.resumed = state["epoch"], state["consumed"], True
        self.start, self.behind = state.get("start", 0), state.get("behind", 0)  # checkpoints before they existed: 0
        if self.skip >= self.total_size:  # saved at the end of an epoch: the next one starts afresh
            self.epoch, self.skip, self.start = self.epoch + 1, 0, 0


class ResumableTraining:
    """Mixin for a LightningDataModule: checkpoints carry the training position, and resuming restores it.

    Lightning saves ``state_dict()`` of the DataModule in every checkpoint and calls ``load_state_dict``
    before it asks for the training DataLoader, which ``resumable_sampler`` then starts at that position.
    """

    trainer: L.Trainer | None
    _train_sampler: ResumableSampler | None = None
    _resume_from: dict[str, int] | None = None

    def resumable_sampler(self, population: int, num_samples: int | None = None, replacement: bool = True) -> ResumableSampler:
        """The training sampler, sharded over the trainer's devices; needs ``self.seed`` and ``self.batch_size``."""
        trainer = self.trainer
        sampler = ResumableSampler(
            population,
            num_samples,
            seed=self.seed,
            replacement=replacement,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
        )
        if self._resume_from:
            sampler.load_state_dict(self._resume_from)
        self._train_sampler = sampler
        return sampler

    def state_dict(self) -> dict[str, Any]:
        if self._train_sampler is None or self.trainer is None:
            return {}
        # Batches this epoch that finished their training step, on each rank: the checkpoint's weights saw them.
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        consumed = batches * self.batch_size * self._train_sampler.num_replicas
        return {"train_sampler": self._train_sampler.state_dict(consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_from = state.get("train_sampler")
