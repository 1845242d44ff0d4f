"""The check that weights are finite: cheap enough to run on everything a checkpoint is about to hold.

A NaN gradient whose loss was finite (one bad batch in mixed precision, an overflow in a kernel) turns every
weight it touches into NaN at the next update, and the loss shows it only one step later. So the checkpoint
writer checks what it saves, not the loss: one fused max-abs pass over every floating tensor (an infinity
norm, which a NaN or an infinity anywhere makes non-finite) and one host sync; only when that fails is the
first bad tensor looked for, to name it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sparse_transformer.errors import InputError


class Diverged(InputError):
    """The weights, the loss or the validation metric stopped being finite or exploded: usually an lr or a
    precision the model cannot take."""


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, float] | None:
    """The name and first bad value (nan, inf) of the first tensor holding a NaN or an infinity; None if all are finite."""
    named = [(name, t.detach()) for name, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not named:
        return None
    if math.isfinite(float(torch.nn.utils.get_total_norm([t for _, t in named], norm_type=math.inf))):
        return None
    name, t = next((name, t) for name, t in named if not torch.isfinite(t).all())
    return name, float(t[~torch.isfinite(t)][0])


def tensors_of(state: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor in a checkpoint's nested dicts and lists, named by its path (``state_dict.model.head.weight``)."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, Mapping):
        for key, value in state.items():
            yield from tensors_of(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from tensors_of(value, f"{prefix}.{i}" if prefix else str(i))
