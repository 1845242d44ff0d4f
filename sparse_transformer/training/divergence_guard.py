"""The divergence guard: a run whose loss or validation diverged stops before those weights are checkpointed.

Lightning runs checkpoint callbacks after all others, so when this guard stops a run neither ``last.ckpt``
nor a best checkpoint holds the diverged weights, and the run can resume from its last good state with a
lower learning rate (the lr may change on resume). A loss can be finite while its gradient is not: the update
then makes the weights NaN, and the loss shows it a step later, possibly after a save. That case is caught
where the weights are written (``checkpoint_io.py`` refuses non-finite weights; ``checkpointing.py`` stops
the run with the same kind of line). Both name the checkpoint the run last wrote or resumed from.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from sparse_transformer.training.checkpointing import RunCheckpoint
from sparse_transformer.training.finite import Diverged

__all__ = ["Diverged", "DivergenceGuard"]


class DivergenceGuard(L.Callback):
    """Stops at a training loss or validation metric that is not finite or above ``max_bits`` bits per byte / dim.

    Guessing uniformly among 256 values costs 8 bits; a model at twice that has diverged, not learned.

    Args:
        checkpoint: the run's checkpoints, whose last good one the message names.
        max_bits: the most bits per byte or dim a healthy run reaches, in training or validation.
    """

    def __init__(self, checkpoint: RunCheckpoint, max_bits: float = 16.0):
        self.checkpoint, self.max_bits = checkpoint, max_bits

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._check(trainer, "training loss", loss.detach() / math.log(2))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric = f"val_{pl_module.unit}"
        if not trainer.sanity_checking and metric in trainer.callback_metrics:
            self._check(trainer, f"validation {metric}", trainer.callback_metrics[metric])

    def _check(self, trainer: L.Trainer, what: str, bits: torch.Tensor) -> None:
        bits = float(bits)
        if math.isfinite(bits) and bits <= self.max_bits:
            return
        value = f"{bits:.4g} bits" if math.isfinite(bits) else str(bits)
        raise Diverged(
            f"{what} is {value} at step {trainer.global_step}; stopped before saving it (last good checkpoint: "
            f"{self.checkpoint.describe_good()}); resume from it with a lower --model.lr or a more stable precision"
        )
