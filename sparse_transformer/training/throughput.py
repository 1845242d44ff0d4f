"""Tokens per second and model FLOPs utilisation, logged by Lightning's own ThroughputMonitor."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor for ``[B, N + 1]`` byte batches, ready to use from YAML.

    Logs ``train|items_per_sec`` (tokens/s: N predicted tokens per window, summed over devices),
    ``train|samples_per_sec`` and, where Lightning knows the device's peak FLOP/s (CUDA GPUs),
    ``train|device|mfu``: the model's own count (``SparseTransformer.flops_per_token``: each attention kind
    counts the work it does, so MFU is exact for every kind), set on the module as the ``flops_per_batch``
    that ThroughputMonitor reads.
    """

    def __init__(self, window_size: int = 20, separator: str = "|"):
        super().__init__(
            batch_size_fn=len,
            length_fn=_predicted_tokens,
            window_size=window_size,
            separator=separator,
        )

    def _set_flops(self, pl_module: L.LightningModule, batch: torch.Tensor, passes: int) -> None:
        # Asked every batch: an adaptive span's cost changes as its spans do.
        per_token = pl_module.model.flops_per_token(batch.shape[1] - 1)
        pl_module.flops_per_batch = passes * per_token * _predicted_tokens(batch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args) -> None:
        self._set_flops(pl_module, batch, passes=3)  # forward + backward
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args) -> None:
        self._set_flops(pl_module, batch, passes=1)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args)


def _predicted_tokens(batch: torch.Tensor) -> int:
    return batch[:, 1:].numel()
