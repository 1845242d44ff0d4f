"""Next-byte language modelling with a Sparse Transformer, as a LightningModule."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from sparse_transformer.adaptive_span import AdaptiveSpanConfig, span_metrics
from sparse_transformer.hourglass import HourglassConfig
from sparse_transformer.modality import TEXT, Modality, unit
from sparse_transformer.model import SparseTransformer
from sparse_transformer.patterns import AttentionPattern
from sparse_transformer.performer import PerformerConfig


class SparseTransformerLM(L.LightningModule):
    """Trains a :class:`SparseTransformer` on ``[B, N + 1]`` byte sequences; metrics in bits per byte (text,
    ``val_bpb``) or bits per dim (images, audio: ``val_bpd``).

    Args:
        seq_len: context length; linked from the DataModule's ``seq_len`` by ``train.py``.
        d_model, n_layers, n_heads, ffn_mult, dropout: network size (ffn width = ffn_mult * d_model).
        pattern: which keys each query attends to (see ``sparse_transformer.patterns``).
        backend: attention implementation; ``auto`` is triton on CUDA, blocks on CPU.
        shape: axes of factorized positional embeddings (e.g. [32, 32, 3] for CIFAR-10); None takes the
            modality's image shape, or 1-D.
        modality: what the bytes are (text, image, audio); linked from the DataModule by ``train.py`` and
            kept in the checkpoint, so sampling knows how to write its output.
        recompute: recompute block activations in the backward pass to save memory.
        persistent_memory: learned key/value vectors per head joined to every softmax, with no feed-forward
            sublayer (all-attention layer); 0 is off.
        hourglass: arrange the blocks as a hierarchy of shortened levels, e.g. ``spec: "2@1 4@3 2@1"``;
            ``n_layers`` must equal the layers of the spec.
        attention: ``sparse`` (the pattern via ``backend``), ``performer`` (FAVOR+; dense pattern only) or
            ``adaptive_span`` (learned per-head spans on top of the pattern; its penalty joins the loss).
        performer, adaptive_span: options of those attentions (``model.performer.features: 256``).
        lr, betas, weight_decay: AdamW; weight decay applies to matrices only.
        warmup_steps: linear warmup from 0, then cosine decay to ``min_lr_ratio * lr`` at the last step.
    """

    def __init__(
        self,
        seq_len: int = 1024,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        ffn_mult: float = 4.0,
        dropout: float = 0.0,
        pattern: AttentionPattern = AttentionPattern(),
        backend: Literal["auto", "triton", "blocks", "flex", "reference"] = "auto",
        shape: list[int] | None = None,
        recompute: bool = False,
        persistent_memory: int = 0,
        hourglass: HourglassConfig | None = None,
        attention: Literal["sparse", "performer", "adaptive_span"] = "sparse",
        performer: PerformerConfig = PerformerConfig(),
        adaptive_span: AdaptiveSpanConfig = AdaptiveSpanConfig(),
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        modality: Modality | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.modality = modality or TEXT
        self.unit = unit(self.modality)
        shape = shape or self.modality["shape"]
        self.model = SparseTransformer(
            seq_len=seq_len,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            ffn_mult=ffn_mult,
            dropout=dropout,
            pattern=pattern,
            backend=backend,
            shape=tuple(shape) if shape else None,
            recompute=recompute,
            persistent_memory=persistent_memory,
            hourglass=hourglass,
            attention=attention,
            performer=performer,
            adaptive_span=adaptive_span,
        )
        self.train_bits, self.val_bits, self.test_bits = MeanMetric(), MeanMetric(), MeanMetric()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]  # (B, N) each
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def on_train_batch_start(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.model.before_train_step(self.global_step)  # FAVOR+ redraws on schedule; spans stay in range

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.train_bits(loss.detach() / math.log(2))
        self.log(f"train_{self.unit}", self.train_bits, on_step=True, on_epoch=True, prog_bar=True)
        auxiliary = self.model.auxiliary_loss()  # adaptive-span penalties; 0 without them
        spans = span_metrics(self.model)
        if spans:
            self.log("span_penalty", auxiliary.detach(), on_step=True)
            self.log_dict(spans, on_step=True)
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
