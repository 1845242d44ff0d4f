"""Next-byte language modelling with a Sparse Transformer, as a LightningModule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from sparse_transformer.errors import InputError
from sparse_transformer.modality import Modality, Text
from sparse_transformer.model import ModelConfig, SparseTransformer
from sparse_transformer.training.fsdp2 import shard


class SparseTransformerLM(L.LightningModule):
    """Trains a :class:`SparseTransformer` on ``[B, N + 1]`` byte sequences; metrics in bits per byte (text,
    ``val_bpb``) or bits per dim (images, audio: ``val_bpd``).

    Args:
        network: the model's options (``model.network.d_model: 256``); its ``seq_len`` is linked from the
            DataModule by ``train.py``. Resolved here against the modality, once: the hyperparameters and the
            model hold the same, resolved config.
        lr, betas, weight_decay: AdamW; weight decay applies to matrices only.
        warmup_steps: linear warmup from 0, then cosine decay to ``min_lr_ratio * lr`` at the last step.
        modality: what the bytes are (None: text); linked from the DataModule by ``train.py`` and kept in the
            checkpoint, so sampling knows how to write its output.
    """

    def __init__(
        self,
        network: ModelConfig = ModelConfig(),
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        modality: Modality | None = None,
    ):
        super().__init__()
        check_optimizer(lr, betas, weight_decay, warmup_steps, min_lr_ratio)
        self.modality = modality = modality or Text()
        network = modality.resolve(network)
        # The objects themselves, resolved (not LightningCLI's copy of the config as parsed): the checkpoint holds
        # the config the model is built from, and load_from_checkpoint rebuilds it from the checkpoint alone.
        self.save_hyperparameters(dict(
            network=network, lr=lr, betas=tuple(betas), weight_decay=weight_decay, warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio, modality=modality,
        ))  # fmt: skip
        self.unit = modality.unit
        self.model = SparseTransformer(network)
        self.val_bits, self.test_bits = MeanMetric(), MeanMetric()

    def configure_model(self) -> None:
        """Under a sharding strategy (``configs/strategies/fsdp2.yaml``, which gives the module a device mesh), shard
        the model over the ranks (``fsdp2.py``); under any other, nothing."""
        if self.device_mesh is not None:
            shard(self.model, self.device_mesh)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch[:, :-1], targets=batch[:, 1:])  # (B, N) each

    def on_train_start(self) -> None:
        """Apply the configured lr and schedule also to a resumed run, whose optimizer and scheduler come back
        with the checkpoint's: the lr may change on resume (a diverged run resumes with a lower one)."""
        scheduler, optimizer = self.lr_schedulers(), self.optimizers(use_pl_optimizer=False)
        before = scheduler.base_lrs[0]
        scheduler.base_lrs = [self.hparams.lr] * len(scheduler.base_lrs)
        for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = self.hparams.lr
            group["lr"] = self.hparams.lr * lr_lambda(scheduler.last_epoch)
        if before != self.hparams.lr:
            rank_zero_info(f"resuming with lr {self.hparams.lr:g} (the checkpoint trained with {before:g})")

    def on_train_batch_start(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.model.before_step(self.global_step)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        # A plain tensor: Lightning keeps the epoch's mean. A torchmetrics object added its own update, compute
        # and NaN check (a host sync on a GPU) to every step.
        self.log(f"train_{self.unit}", loss.detach() / math.log(2), on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch))
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
        # Lightning's mixed-precision plugins refuse to clip gradients for an optimizer that unscales them itself,
        # as the fused kernel does (even bf16, which has no scaler): those runs take the per-tensor loop.
        fused = not str(self.trainer.precision).endswith("-mixed")
        optimizer, schedule = self.optimizer_and_schedule(max(int(self.trainer.estimated_stepping_batches), 1), fused)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_and_schedule(
        self, total_steps: int, fused: bool = True
    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW and its per-step warmup-cosine schedule over ``total_steps``; ``bench/overhead.py``'s plain loop
        steps the same pair by hand."""
        hp = self.hparams
        return adamw_with_schedule(
            self.parameters(), hp.lr, hp.betas, hp.weight_decay, hp.warmup_steps, hp.min_lr_ratio, total_steps, fused
        )


def adamw_with_schedule(
    parameters: Iterable[torch.nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    warmup_steps: int,
    min_lr_ratio: float,
    total_steps: int,
    fused: bool = True,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only (not biases or norms), and its warmup-cosine schedule.

    The fused kernel (one op for every tensor, on CPU and CUDA) unless ``fused`` is False or a parameter does not
    allow it: on the CPU the per-tensor loop costs a 2M-parameter model a few ms per step.
    """
    parameters = list(parameters)
    matrices = [p for p in parameters if p.dim() >= 2]
    others = [p for p in parameters if p.dim() < 2]
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in parameters)
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        fused=fused or None,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
    )
    return optimizer, schedule


def check_optimizer(lr: float, betas: tuple[float, float], weight_decay: float, warmup_steps: int, min_lr_ratio: float) -> None:
    """Refuse optimizer options AdamW or the schedule cannot use, in one line naming the value."""
    if not (math.isfinite(lr) and 0 < lr < 1e6):
        raise InputError(f"model lr={lr} must be a positive number below 1e6")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise InputError(f"model betas={list(betas)} must be two numbers in [0, 1)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise InputError(f"model weight_decay={weight_decay} must be >= 0")
    if warmup_steps < 0:
        raise InputError(f"model warmup_steps={warmup_steps} must be >= 0")
    if not 0 <= min_lr_ratio <= 1:
        raise InputError(f"model min_lr_ratio={min_lr_ratio} must be in [0, 1]")


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, cosine decay to ``floor`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
