"""The interface every attention kind implements, so the model, the LightningModule and the throughput monitor
never need to ask which kind a block holds.

A kind is multi-head causal self-attention ``(B, N, C) -> (B, N, C)``. It answers:

- ``forward(x, cache=None)``: attend from position 0; with a cache, also fill it (prefill);
- ``new_cache()`` and ``decode(x, cache, pos)``: incremental decoding, where ``can_decode``; a one-line error
  where not;
- ``auxiliary_loss()``: a term to add to the training loss, or None;
- ``metrics(name)``: values to log under the module's name;
- ``before_step(step)``: upkeep before each training step;
- ``flops_per_token(n)``: its forward FLOPs per token at sequence length n, counting the work it does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from sparse_transformer.errors import InputError
from sparse_transformer.model.config import ModelConfig
from sparse_transformer.model.kv_cache import BlockKVCache


class CannotDecode(InputError):
    """Incremental decoding asked of an attention kind that has no key/value cache."""


class Attention(nn.Module):
    """The shared part of every kind: query/key/value and output projections around :meth:`attend`.

    A kind implements :meth:`attend` (the heads' attention, ``(B, H, N, D)`` each way) and
    :meth:`attention_flops`, and overrides the other methods where it has something to say.
    """

    can_decode: ClassVar[bool] = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.attention.name  # for messages
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, cache: BlockKVCache | None = None) -> torch.Tensor:
        """Attend over ``x`` ``(B, N, C)`` from position 0; with a ``cache``, also store its keys and values."""
        if cache is not None and not self.can_decode:
            raise self.cannot_decode()
        B, N, C = x.shape
        q, k, v = self.heads(x)  # (B, H, N, D) each
        return self.merge(self.attend(q, k, v, cache))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: BlockKVCache | None) -> torch.Tensor:
        """Causal attention of q, k, v ``(B, H, N, D)``; returns ``(B, H, N, D)``."""
        raise NotImplementedError

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        return self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, D) each

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, D)`` heads -> ``(B, N, C)`` through the output projection."""
        B, H, N, D = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, N, H * D))

    def new_cache(self) -> BlockKVCache:
        """An empty key/value cache for :meth:`forward` (prefill), then :meth:`decode`."""
        raise self.cannot_decode()

    def decode(self, x: torch.Tensor, cache: BlockKVCache, pos: int) -> torch.Tensor:
        """One new position ``x`` ``[B, 1, C]`` at ``pos``, attending through the cache."""
        raise self.cannot_decode()

    def cannot_decode(self) -> CannotDecode:
        return CannotDecode(
            f"attention {self.kind!r} has no key/value cache; generate by full recompute (sample.py --no-kv-cache)"
        )

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A term for the training loss (None: nothing to add)."""
        return None

    def metrics(self, name: str) -> dict[str, float]:
        """Values to log each training step, keyed under ``name`` (the module's path in the model)."""
        return {}

    def before_step(self, step: int) -> None:
        """Upkeep before training step ``step``."""

    def flops_per_token(self, n: int) -> float:
        """Forward FLOPs per token at sequence length ``n``: 2 per multiply-add, the projections included."""
        linear = 2.0 * (self.qkv.weight.numel() + self.proj.weight.numel())
        return linear + self.attention_flops(n) / n

    def attention_flops(self, n: int) -> float:
        """FLOPs of the heads' attention over one sequence of ``n`` positions, as this kind computes it."""
        raise NotImplementedError
