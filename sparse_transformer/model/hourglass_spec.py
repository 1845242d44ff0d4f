"""An Hourglass hierarchy's options, in the notation of Nawrot et al. (2021): ``layers@factor`` from input to output.

Below the config (which holds one) and the model (``hourglass.py``, which builds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sparse_transformer.errors import InputError


class HourglassError(InputError, ValueError):
    """A hierarchy that cannot be built."""


@dataclass(frozen=True)
class HourglassConfig:
    """A hierarchy of shortened levels.

    Args:
        spec: ``layers@factor`` tokens from input to output; the factors start and end at 1, rise to one
            peak and mirror back down, each dividing the next (e.g. ``"2@1 4@3 2@1"``). The layers sum to
            ``model.n_layers``.
        pooling: how k vectors become one: ``avg`` or ``linear`` (concatenate, project).
        upsampling: how one vector becomes k: ``repeat`` or ``linear`` (project to k vectors).
        attention_resampling: also add attention across the boundary: each shortened token attends to
            the k positions it pools, and each full-length position to every shortened token it may see.
    """

    spec: str = "2@1 4@2 2@1"
    pooling: Literal["avg", "linear"] = "linear"
    upsampling: Literal["repeat", "linear"] = "linear"
    attention_resampling: bool = False

    def check(self) -> None:
        """Refuse bad options in one line. Called when the model is built (LightningCLI reports an error
        raised while it reads an optional dataclass as a traceback, not as a message)."""
        if self.pooling not in ("avg", "linear"):
            raise HourglassError(f"hourglass pooling {self.pooling!r} is not one of avg, linear")
        if self.upsampling not in ("repeat", "linear"):
            raise HourglassError(f"hourglass upsampling {self.upsampling!r} is not one of repeat, linear")
        parse_spec(self.spec)

    @property
    def levels(self) -> list[tuple[int, int]]:
        """The spec as ``[(layers, factor), ...]``."""
        return parse_spec(self.spec)

    @property
    def n_layers(self) -> int:
        return sum(n for n, _ in self.levels)


def parse_spec(spec: str) -> list[tuple[int, int]]:
    """``"2@1 4@3 2@1"`` -> ``[(2, 1), (4, 3), (2, 1)]``, or a one-line HourglassError."""
    levels = [_parse_token(tok, spec) for tok in spec.split()]
    factors = [f for _, f in levels]
    peak = len(levels) // 2
    if not levels or len(levels) % 2 == 0 or factors != factors[::-1] or factors[0] != 1:
        raise HourglassError(
            f"hourglass spec {spec!r} must be an odd number of layers@factor tokens whose factors "
            "start and end at 1 and mirror around the middle, e.g. '2@1 4@3 2@1'"
        )
    for lo, hi in zip(factors[:peak], factors[1 : peak + 1]):
        if hi <= lo or hi % lo:
            raise HourglassError(f"hourglass spec {spec!r}: factor {hi} after {lo} must be a larger multiple of it")
    if levels[peak][0] < 1:
        raise HourglassError(f"hourglass spec {spec!r}: the innermost level needs at least 1 layer")
    return levels


def _parse_token(token: str, spec: str) -> tuple[int, int]:
    layers, at, factor = token.partition("@")
    if not (at and layers.isdigit() and factor.isdigit() and int(factor) >= 1):
        raise HourglassError(f"hourglass spec {spec!r}: token {token!r} is not layers@factor with layers >= 0 and factor >= 1")
    return int(layers), int(factor)


# Checkpoints carry the config; let torch.load(weights_only=True) rebuild it.
torch.serialization.add_safe_globals([HourglassConfig])
