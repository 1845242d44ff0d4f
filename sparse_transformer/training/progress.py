"""Rich progress with the training step, where Lightning's bar would read "Epoch 5/-2" for a run bounded by steps."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class RunProgressBar(RichProgressBar):
    """Lightning's RichProgressBar; its metrics column also shows ``step`` (of ``max_steps``).

    The bar's title is a private method of RichProgressBar (``_get_train_description``), overridden here
    because no public hook sets it; ``tests/test_progress.py`` fails loudly if Lightning renames it.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs is not None and epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        limit = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        return {"step": f"{trainer.global_step}{limit}", **items}
