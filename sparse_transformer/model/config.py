"""The network's options, declared once: the config travels whole to the model, its blocks and their attention.

Checks that need only the options run when the config is made (``__post_init__``: the CLI reports them as
it parses); :meth:`ModelConfig.resolve` fills in what the config leaves to the data (the pattern's stride,
the positional axes) and checks every value against the context. The attention is one of the kinds in
``attention/``: each is a dataclass of its own options that checks itself against the rest of this config
and builds its module (:class:`AttentionKind`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from sparse_transformer.errors import InputError
from sparse_transformer.model.hourglass_spec import HourglassConfig
from sparse_transformer.model.patterns import AttentionPattern, PatternError, sqrt_stride


class ConfigError(InputError, ValueError):
    """Options that cannot build a model (a ValueError, so the CLI's parser reports it as a bad value)."""


class AttentionKind:
    """The options of one attention kind; ``model.network.attention`` names the kind by its class::

        attention:
          class_path: Performer        # or the full path of a kind defined outside the library
          init_args: {features: 64}

    A kind is one file in ``attention/``: a frozen dataclass of its options subclassing this, with its
    ``name``, its checks against the rest of the config and the module it builds. Defining one registers it
    (``kinds``), so a checkpoint that holds its options loads and ``class_path`` finds it by name.
    """

    name: ClassVar[str]
    kinds: ClassVar[dict[str, type[AttentionKind]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        AttentionKind.kinds[cls.name] = cls
        torch.serialization.add_safe_globals([cls])  # checkpoints carry the options

    def check(self, config: ModelConfig) -> None:
        """Refuse, in one line, the rest of ``config`` where this kind cannot work with it."""

    def build(self, config: ModelConfig, seq_len: int, layer: int) -> nn.Module:
        """The attention of block ``layer`` on a sequence of ``seq_len`` positions (a level's length in an Hourglass)."""
        raise NotImplementedError

    @property
    def replaces_feed_forward(self) -> bool:
        """Whether a block with this attention has no feed-forward sublayer (the all-attention layer)."""
        return False


def _sparse() -> AttentionKind:
    return AttentionKind.kinds["sparse"]()  # attention/sparse.py, the paper's own kind


@dataclass(frozen=True)
class ModelConfig:
    """A Sparse Transformer over bytes (``model.network`` in a config).

    Args:
        d_model: width of the residual stream.
        n_layers: residual blocks; with ``hourglass``, the layers of its spec.
        n_heads: attention heads; must divide d_model.
        ffn_mult: feed-forward width as a multiple of d_model.
        dropout: on the embeddings and on every residual branch, in [0, 1).
        pattern: which keys each query attends to (section 4).
        attention: how the heads attend: ``Sparse`` (the pattern's tiles, by a backend; optionally with
            persistent memory), ``Performer`` (FAVOR+; dense pattern only) or ``AdaptiveSpan`` (a learned span per
            head on top of the pattern), each with its own options.
        hourglass: arrange the blocks as a hierarchy of shortened levels, e.g. ``spec: "2@1 4@3 2@1"``.
        positions: axes of the factorized positional embedding, multiplying to seq_len. None derives them
            from the data: (rows, cols, channels) for images, a matrix as wide as the stride for audio
            (section 5.1); for text a 1-D table up to ``LONG_CONTEXT`` (8,192) positions and, beyond, a matrix
            as wide as the stride (the divisor of seq_len nearest it; about sqrt(N) without one), as the
            paper's enwik8 ([96, 128] at 12,288): at N = 2^20 with the default stride, (1024, 1024), 2,048 vectors
            instead of 1,048,576. ``[N]`` asks for a 1-D table at any length.
        recompute: recompute each block's activations in the backward pass instead of storing them,
            trading about a third more compute for memory that no longer grows with depth.
        compile: ``torch.compile`` each block for training and evaluation (Inductor fuses the norms and the
            feed-forward; the attention sublayer, projections and kernel, stays one eager call). Costs a compile at the first step;
            sampling's incremental decoding runs eagerly. On a CPU it does not pay (0.91x eager's speed,
            ``bench/results/compile-cpu.md``).
        seq_len: the context N; linked from the DataModule's seq_len by ``train.py``.
        vocab_size: 256: the model reads bytes.
    """

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: float = 4.0
    dropout: float = 0.0
    pattern: AttentionPattern = field(default_factory=AttentionPattern)
    attention: AttentionKind = field(default_factory=_sparse)
    hourglass: HourglassConfig | None = None
    positions: tuple[int, ...] | None = None
    recompute: bool = False
    compile: bool = False
    seq_len: int | None = None
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "vocab_size"):
            if _not_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"model {name}={getattr(self, name)!r} must be an int >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not self.ffn_mult > 0:
            raise ConfigError(f"ffn_mult={self.ffn_mult} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if not isinstance(self.attention, AttentionKind):
            known = ", ".join(cls.__name__ for cls in AttentionKind.kinds.values())
            raise ConfigError(f"attention={self.attention!r} is not an attention kind; use one of {known}")
        self.attention.check(self)
        if self.hourglass is not None:
            self.hourglass.check()
            if self.hourglass.n_layers != self.n_layers:
                raise ConfigError(
                    f"n_layers={self.n_layers} does not match the {self.hourglass.n_layers} layers of hourglass spec "
                    f"{self.hourglass.spec!r}; set n_layers to {self.hourglass.n_layers}"
                )
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(self.positions))
            if not self.positions or any(_not_int(n) or n < 1 for n in self.positions):
                raise ConfigError(f"positions={list(self.positions)} must be one or more ints >= 1")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_ff(self) -> int:
        return int(self.ffn_mult * self.d_model)

    @property
    def context(self) -> int:
        """seq_len, which must be set: the model is built for one context."""
        n = self.seq_len
        if n is None:
            raise ConfigError("model seq_len is not set; train.py links it from the DataModule's seq_len")
        if _not_int(n) or n < 1:
            raise ConfigError(f"model seq_len={n!r} must be an int >= 1")
        return n

    def resolve(self, stride: int | None = None, positions: tuple[int, ...] | None = None, source: str = "context") -> ModelConfig:
        """This config with what it leaves out filled in, every value checked against the context.

        The pattern's stride is its own, else ``stride`` (the data's choice; ``source`` names the data in
        messages), else about sqrt(N) in whole blocks (section 4.2); the positional axes are the config's own,
        else ``positions``, else :func:`default_positions`. Resolving a resolved config changes nothing.
        """
        n, pattern = self.context, self.pattern
        pattern.check(n)
        if pattern.needs_stride and pattern.stride is None:
            stride = sqrt_stride(n, pattern.block_size) if stride is None else stride
            try:
                pattern = dataclasses.replace(pattern, stride=stride)
            except PatternError as e:
                raise ConfigError(f"{e} (stride {stride} follows from the {source}); set pattern.stride") from e
        if pattern.needs_stride and pattern.stride > n:
            raise ConfigError(f"pattern stride={pattern.stride} is longer than the context seq_len={n}; use a shorter stride")
        if pattern.kind != "dense" and n >= LONG_SPARSE and (density := pattern.density(self.n_heads, n)) > NEARLY_DENSE:
            raise ConfigError(
                f"pattern {pattern.kind} with stride={pattern.stride} in blocks of {pattern.block_size} computes about "
                f"{density:.0%} of the causal tiles at seq_len={n:,}, nearly dense attention at N^2 cost; use a stride near "
                f"sqrt(seq_len x block_size) = {sqrt_stride(n * pattern.block_size, pattern.block_size)}, or kind dense to mean it"
            )
        positions = self.positions or positions or default_positions(n, pattern.stride)
        if math.prod(positions) != n:
            raise ConfigError(
                f"positions={list(positions)} multiply to {math.prod(positions)}, but the data's seq_len is {n}; "
                "leave positions out to derive them from the data"
            )
        resolved = dataclasses.replace(self, pattern=pattern, positions=tuple(positions))
        return self if resolved == self else resolved


LONG_CONTEXT = 8192  # longer contexts get factorized positions by default
LONG_SPARSE, NEARLY_DENSE = 65536, 0.5  # a sparse pattern this long computing more of the causal tiles is refused


def default_positions(n: int, stride: int | None) -> tuple[int, ...]:
    """Positional axes for a context of ``n`` when neither the config nor the data gives them: 1-D up to
    ``LONG_CONTEXT``, beyond it (rows, cols) with cols the divisor of n nearest the stride (or sqrt(n)), so the
    tables hold about 2 sqrt(n) vectors instead of n."""
    if n <= LONG_CONTEXT:
        return (n,)
    target = stride or math.isqrt(n)
    divisors = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
    cols = min(divisors, key=lambda d: (abs(d - target), d))
    return (n // cols, cols)


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


# Checkpoints carry the config; let torch.load(weights_only=True) rebuild it.
torch.serialization.add_safe_globals([ModelConfig])
