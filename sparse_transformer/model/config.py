"""The network's options, declared once: the config travels whole to the model, its blocks and their attention.

Checks that need only the options run when the config is made (``__post_init__``: the CLI reports them as
it parses); checks against the data run in :meth:`ModelConfig.resolve`, which also derives what follows
from the data: the context, the pattern's stride and the positional shape.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from sparse_transformer.errors import InputError
from sparse_transformer.model.attention.adaptive_span import AdaptiveSpanConfig
from sparse_transformer.model.attention.performer import PerformerConfig
from sparse_transformer.model.hourglass import HourglassConfig
from sparse_transformer.model.kernels import BACKENDS
from sparse_transformer.model.patterns import AttentionPattern, PatternError

if TYPE_CHECKING:
    from sparse_transformer.modality import Modality

Backend = Literal["auto", "triton", "cpp", "pieces", "blocks", "flex", "reference"]
AttentionKind = Literal["sparse", "performer", "adaptive_span"]


class ConfigError(InputError, ValueError):
    """Options that cannot build a model (a ValueError, so the CLI's parser reports it as a bad value)."""


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
        backend: how ``sparse`` attention is computed; every backend computes the same function.
            ``auto``: triton on CUDA, pieces on the CPU, blocks elsewhere.
        attention: ``sparse`` (the pattern, by ``backend``), ``performer`` (FAVOR+; dense pattern only) or
            ``adaptive_span`` (a learned span per head on top of the pattern).
        performer: FAVOR+ options, for ``attention: performer``.
        adaptive_span: span options, for ``attention: adaptive_span``.
        persistent_memory: M learned key/value vectors per head joined to every softmax, in place of the
            feed-forward sublayer (all-attention layer); a multiple of the pattern's block_size; 0 is off.
        hourglass: arrange the blocks as a hierarchy of shortened levels, e.g. ``spec: "2@1 4@3 2@1"``.
        positions: axes of the factorized positional embedding, multiplying to seq_len. None derives them
            from the data: (rows, cols, channels) for images, a matrix as wide as the stride for audio
            (section 5.1), 1-D for text.
        recompute: recompute each block's activations in the backward pass instead of storing them,
            trading about a third more compute for memory that no longer grows with depth.
        seq_len: the context N; linked from the DataModule's seq_len by ``train.py``.
        vocab_size: 256: the model reads bytes.
    """

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: float = 4.0
    dropout: float = 0.0
    pattern: AttentionPattern = field(default_factory=AttentionPattern)
    backend: Backend = "auto"
    attention: AttentionKind = "sparse"
    performer: PerformerConfig = field(default_factory=PerformerConfig)
    adaptive_span: AdaptiveSpanConfig = field(default_factory=AdaptiveSpanConfig)
    persistent_memory: int = 0
    hourglass: HourglassConfig | None = None
    positions: tuple[int, ...] | None = None
    recompute: bool = False
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
        if self.attention not in ("sparse", "performer", "adaptive_span"):
            raise ConfigError(f"attention={self.attention!r} is not one of sparse, performer, adaptive_span")
        if self.backend not in BACKENDS:
            raise ConfigError(f"attention backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.attention != "sparse" and self.backend != "auto":
            raise ConfigError(
                f"backend={self.backend!r} picks a block-sparse kernel, which attention={self.attention!r} "
                "does not use; leave backend: auto"
            )
        if self.attention == "performer" and self.pattern.kind != "dense":
            raise ConfigError(
                f"attention='performer' is global causal linear attention; pattern.kind={self.pattern.kind!r} "
                "cannot restrict it (use pattern.kind: dense)"
            )
        self._check_persistent_memory()
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

    def _check_persistent_memory(self) -> None:
        m = self.persistent_memory
        if _not_int(m) or m < 0:
            raise ConfigError(f"persistent_memory={m!r} must be an int >= 0 (0 turns it off)")
        if m and self.attention != "sparse":
            raise ConfigError(
                f"persistent_memory={m} joins the block-sparse softmax; attention={self.attention!r} has none "
                "(use attention: sparse, or persistent_memory: 0)"
            )
        if m % self.pattern.block_size:
            raise ConfigError(
                f"persistent_memory={m} must be a multiple of pattern block_size={self.pattern.block_size}: "
                "the persistent vectors are joined as whole key blocks"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_ff(self) -> int:
        return int(self.ffn_mult * self.d_model)

    def resolve(self, modality: Modality) -> ModelConfig:
        """This config for ``modality``'s data: the stride and positions it leaves out derived, and every value
        checked against the context. Resolving a resolved config changes nothing."""
        n, pattern = self.seq_len, self.pattern
        if n is None:
            raise ConfigError("model seq_len is not set; train.py links it from the DataModule's seq_len")
        if _not_int(n) or n < 1:
            raise ConfigError(f"model seq_len={n!r} must be an int >= 1")
        pattern.check(n)
        if pattern.needs_stride and pattern.stride is None:
            stride = modality.default_stride(n, pattern.block_size)
            try:
                pattern = dataclasses.replace(pattern, stride=stride)
            except PatternError as e:
                raise ConfigError(f"{e} (stride {stride} follows from the {modality.noun}); set pattern.stride") from e
        if pattern.needs_stride and pattern.stride > n:
            raise ConfigError(f"pattern stride={pattern.stride} is longer than the context seq_len={n}; use a shorter stride")
        stride = pattern.stride if pattern.needs_stride else None
        positions = self.positions or modality.positions(n, stride)
        if math.prod(positions) != n:
            raise ConfigError(
                f"positions={list(positions)} multiply to {math.prod(positions)}, but the data's seq_len is {n}; "
                "leave positions out to derive them from the data"
            )
        return dataclasses.replace(self, pattern=pattern, positions=positions)


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


# Checkpoints carry the config; let torch.load(weights_only=True) rebuild it.
torch.serialization.add_safe_globals([ModelConfig])
