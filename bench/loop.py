"""What bench/overhead.py and bench/peers.py share: the training loop one writes by hand, the same loop's
time split into segments, and held-out bits per byte.

A step's marks: when its batch is in hand, when the loss is computed, when the backward ends, when the
optimizer (clipping, step, schedule) ends; the next step's first mark closes it. So a step splits into
forward + loss, backward, optimizer, and "between": data loading, logging and whatever hooks run outside
the other three.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import lightning as L
import torch

SEGMENTS = ("forward + loss", "backward", "optimizer", "between")


def step_segments(marks: list[list[float]]) -> list[dict[str, float]]:
    """Per step, seconds in each of :data:`SEGMENTS` and ``total``; a step needs the next one's start, so the
    last list of marks closes the one before it."""
    steps = []
    for this, following in zip(marks, marks[1:]):
        start, forward, backward, optimizer = this
        times = (forward - start, backward - forward, optimizer - backward, following[0] - optimizer)
        steps.append({**dict(zip(SEGMENTS, times)), "total": following[0] - start})
    return steps


def medians(steps: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(step[key] for step in steps) for key in (*SEGMENTS, "total")}


def forever(loader: Callable[[], Iterable[torch.Tensor]]) -> Iterator[torch.Tensor]:
    """Batches from epoch after epoch, as Lightning runs past an epoch's end."""
    return (batch for _ in itertools.count() for batch in loader())


def plain_loop(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[torch.Tensor],
    steps: int,
    clip: float = 1.0,
) -> list[list[float]]:
    """``steps`` training steps by hand: loss, backward, gradient clipping by norm, AdamW, schedule. Returns
    each step's marks and a last start that closes the final step."""
    marks = []
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        if step == steps:
            marks.append([start])
            return marks
        loss = loss_fn(batch)
        forward = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        schedule.step()
        marks.append([start, forward, backward, time.perf_counter()])
    return marks


class StepMarks(L.Callback):
    """The same marks from Lightning's hooks, for ``trainer.fit``: batch start, before backward, after backward,
    and batch end. Put it first among the callbacks, so its batch end comes right after the optimizer step and
    the other callbacks' batch ends fall "between"."""

    def __init__(self):
        self.marks: list[list[float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.marks.append([time.perf_counter()])

    def on_before_backward(self, trainer, module, loss) -> None:
        self.marks[-1].append(time.perf_counter())

    def on_after_backward(self, trainer, module) -> None:
        self.marks[-1].append(time.perf_counter())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.marks[-1].append(time.perf_counter())

    def on_train_end(self, trainer, module) -> None:
        self.marks.append([time.perf_counter()])


@torch.no_grad()
def held_out_bits(logits_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor], limit: int) -> float:
    """Mean bits per predicted byte over the first ``limit`` batches of ``[B, N + 1]`` windows (all if 0)."""
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if limit and i == limit:
            break
        logits = logits_fn(batch[:, :-1])  # (B, N, 256)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count / math.log(2)
