"""The NaN guard: a diverged run stops before its broken weights are checkpointed (on in every run)."""

from __future__ import annotations

import lightning as L
import torch

from sparse_transformer.errors import InputError


class NonFiniteLoss(InputError):
    """The loss became NaN or infinite: usually a learning rate or precision the model cannot take."""


class NonFiniteLossGuard(L.Callback):
    """Stop at the first non-finite training loss, before any checkpoint of the broken weights is written.

    Lightning runs checkpoint callbacks after the others, so ``last.ckpt`` stays the last good state.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            ckpt = next((c.last_model_path or c.best_model_path for c in trainer.checkpoint_callbacks), "") or "none yet"
            raise NonFiniteLoss(
                f"training loss is {loss.item()} at step {trainer.global_step}; stopped before saving it "
                f"(last good checkpoint: {ckpt}); lower model.lr or use a more stable precision"
            )
