"""Tokens per second and model FLOPs utilisation, logged by Lightning's own ThroughputMonitor."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from torch import nn

from sparse_transformer.attention import CausalSelfAttention


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token at sequence length ``seq_len``, counting only the attention tiles computed.

    Every linear layer costs 2 * in * out per token; attention costs 2 * 2 * d_head per key a query sees in
    QK^T and AV, where the keys are those of the non-zero tiles of each head's layout (so a sparse pattern
    is credited with the work it does, not with dense attention's). Training is 3x this (forward, backward).
    Exact for a flat stack of block-sparse layers; an approximation elsewhere: Hourglass levels are counted
    as if at full length (an overcount) and FAVOR+ / adaptive-span attention by their linear layers only.
    """
    flops = sum(2.0 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            block = m.block_size
            nb = -(-seq_len // block)
            tiles = m.layout[:, :nb, :nb].sum().item()  # over heads
            keys = tiles * block * block / (nb * block)  # keys per query, summed over heads
            flops += 2 * 2 * (m.qkv.in_features // m.n_heads) * keys
    return flops


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor for ``[B, N + 1]`` byte batches, ready to use from YAML.

    Logs ``train|items_per_sec`` (tokens/s: N predicted tokens per window, summed over devices),
    ``train|samples_per_sec`` and, where Lightning knows the device's peak FLOP/s (CUDA GPUs),
    ``train|device|mfu``: model FLOPs from :func:`model_flops_per_token`, set on the module as the
    ``flops_per_batch`` that ThroughputMonitor reads.
    """

    def __init__(self, window_size: int = 20, separator: str = "|"):
        super().__init__(
            batch_size_fn=len,
            length_fn=_predicted_tokens,
            window_size=window_size,
            separator=separator,
        )
        self._per_token: dict[int, float] = {}  # seq_len -> forward FLOPs per token

    def _set_flops(self, pl_module: L.LightningModule, batch: torch.Tensor, passes: int) -> None:
        n = batch.shape[1] - 1
        if n not in self._per_token:
            self._per_token[n] = model_flops_per_token(pl_module.model, n)
        pl_module.flops_per_batch = passes * self._per_token[n] * _predicted_tokens(batch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args) -> None:
        self._set_flops(pl_module, batch, passes=3)  # forward + backward
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args) -> None:
        self._set_flops(pl_module, batch, passes=1)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args)


def _predicted_tokens(batch: torch.Tensor) -> int:
    return batch[:, 1:].numel()
