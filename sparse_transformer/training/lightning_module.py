"""Next-byte language modelling with a Sparse Transformer, as a LightningModule."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from sparse_transformer.modality import Modality
from sparse_transformer.model import ModelConfig, SparseTransformer


class SparseTransformerLM(L.LightningModule):
    """Trains a :class:`SparseTransformer` on ``[B, N + 1]`` byte sequences; metrics in bits per byte (text,
    ``val_bpb``) or bits per dim (images, audio: ``val_bpd``).

    Args:
        network: the model's options (``model.network.d_model: 256``); its ``seq_len`` is linked from the
            DataModule by ``train.py``.
        lr, betas, weight_decay: AdamW; weight decay applies to matrices only.
        warmup_steps: linear warmup from 0, then cosine decay to ``min_lr_ratio * lr`` at the last step.
        modality: what the bytes are (``Modality.spec()``); linked from the DataModule by ``train.py`` and kept
            in the checkpoint, so sampling knows how to write its output.
    """

    def __init__(
        self,
        network: ModelConfig = ModelConfig(),
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        modality: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.modality = Modality.from_spec(modality)
        self.unit = self.modality.unit
        self.model = SparseTransformer(network, self.modality)
        self.train_bits, self.val_bits, self.test_bits = MeanMetric(), MeanMetric(), MeanMetric()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]  # (B, N) each
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def on_train_batch_start(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.model.before_step(self.global_step)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.train_bits(loss.detach() / math.log(2))
        self.log(f"train_{self.unit}", self.train_bits, on_step=True, on_epoch=True, prog_bar=True)
        if metrics := self.model.metrics():
            self.log_dict(metrics, on_step=True)
        auxiliary = self.model.auxiliary_loss()
        if auxiliary is None:
            return loss
        self.log("auxiliary_loss", auxiliary.detach(), on_step=True)
        return loss + auxiliary

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_bits.update(self._loss(batch) / math.log(2), weight=batch[:, 1:].numel())
        self.log(f"val_{self.unit}", self.val_bits, on_epoch=True, prog_bar=True)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.test_bits.update(self._loss(batch) / math.log(2), weight=batch[:, 1:].numel())
        self.log(f"test_{self.unit}", self.test_bits, on_epoch=True)

    def configure_optimizers(self):
        hp = self.hparams
        matrices = [p for p in self.parameters() if p.dim() >= 2]
        others = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": matrices, "weight_decay": hp.weight_decay}, {"params": others, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=hp.betas,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, cosine decay to ``floor`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
