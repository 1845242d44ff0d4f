"""The check that weights are finite: cheap enough to run on everything a checkpoint is about to hold.

A NaN gradient whose loss was finite (one bad batch in mixed precision, an overflow in a kernel) turns every
weight it touches into NaN at the next update, and the loss shows it only one step later. So the checkpoint
writer checks what it saves, not the loss. The check is a sum per tensor and one host sync: a NaN or an
infinity anywhere makes the sum of all of them non-finite. (Sums, not a max: on this project's 2-core EPYC,
10M floats sum in 3 ms, and take 60 ms for an infinity norm and 175 ms for ``isfinite().all()``; the whole check
costs 1-4% of a save, ``bench/results/trust-cpu.md``.) Only when the sum is not finite are the tensors searched,
to name the first bad one, or to find that the sum merely overflowed on huge finite values.
"""

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
    named = [(name, t.detach()) for name, t in named if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not named:
        return None
    device = named[0][1].device
    sums = [t.sum(dtype=torch.float32 if t.element_size() < 4 else t.dtype).float().to(device) for _, t in named]
    if math.isfinite(torch.stack(sums).sum().item()):
        return None
    for name, t in named:
        bad = ~torch.isfinite(t)
        if bad.any():
            return name, float(t[bad][0])
    return None  # the sum overflowed on values that are all finite


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
