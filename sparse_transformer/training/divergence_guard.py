"""The divergence guard: a run whose loss or validation diverged stops before those weights are checkpointed.

Lightning runs checkpoint callbacks after all others, so when this guard stops a run neither ``last.ckpt``
nor a best checkpoint holds the diverged weights, and the run can resume from its last good state with a
lower learning rate (the lr may change on resume).
"""

from __future__ import annotations

import math

import lightning as L
import torch

from sparse_transformer.errors import InputError


class Diverged(InputError):
    """The loss or the validation metric became non-finite or exploded: usually an lr or precision the model cannot take."""


class DivergenceGuard(L.Callback):
    """Stops at a training loss or validation metric that is not finite or above ``max_bits`` bits per byte / dim.

    Guessing uniformly among 256 values costs 8 bits; a model at twice that has diverged, not learned.

    Args:
        max_bits: the most bits per byte or dim a healthy run reaches, in training or validation.
    """

    def __init__(self, max_bits: float = 16.0):
        self.max_bits = max_bits

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
        last = next((c.last_model_path or c.best_model_path for c in trainer.checkpoint_callbacks), "") or "none yet"
        value = f"{bits:.4g} bits" if math.isfinite(bits) else str(bits)
        raise Diverged(
            f"{what} is {value} at step {trainer.global_step}; stopped before "
            f"saving it (last good checkpoint: {last}); resume from it with a lower --model.lr or a more stable precision"
        )
