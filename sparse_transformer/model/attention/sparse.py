"""Block-sparse multi-head attention: each head attends only to the tiles of the pattern's layout.

The backend (triton, pieces, blocks, flex, reference, or auto) computes the same function; ``auto`` is chosen at each
call from the input's device, so a model moves between CPU and GPU freely. With ``persistent_memory`` every
softmax also sees that many learned key/value vectors per head (``persistent_memory.py``). This is the one
kind with a key/value cache for incremental decoding (``kv_cache.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparse_transformer.model.attention.base import Attention
from sparse_transformer.model.attention.persistent_memory import PersistentMemory
from sparse_transformer.model.config import AttentionKind, ConfigError, ModelConfig
from sparse_transformer.model.kernels import BACKENDS, Backend, get_backend, get_packed_backend
from sparse_transformer.model.kv_cache import BlockKVCache


@dataclass(frozen=True)
class Sparse(AttentionKind):
    """The pattern's tiles (the default kind): ``attention: {class_path: Sparse, init_args: {backend: pieces}}``.

    Args:
        backend: how the tiles are computed; every backend computes the same function. ``auto``: triton on
            CUDA, cpp on the CPU (pieces where it cannot be built), blocks elsewhere.
        persistent_memory: M learned key/value vectors per head joined to every softmax, in place of the
            feed-forward sublayer (the all-attention layer); a multiple of the pattern's block_size; 0 is off.
    """

    backend: Backend = "auto"
    persistent_memory: int = 0
    name: ClassVar[str] = "sparse"

    def __post_init__(self) -> None:
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ConfigError(f"attention backend {self.backend!r} is not one of auto, {', '.join(BACKENDS)}")
        m = self.persistent_memory
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigError(f"persistent_memory={m!r} must be an int >= 0 (0 turns it off)")

    def check(self, config: ModelConfig) -> None:
        m = self.persistent_memory
        if m % config.pattern.block_size:
            raise ConfigError(
                f"persistent_memory={m} must be a multiple of pattern block_size={config.pattern.block_size}: "
                "the persistent vectors are joined as whole key blocks"
            )

    def build(self, config: ModelConfig, seq_len: int, layer: int) -> SparseAttention:
        return SparseAttention(config, seq_len, layer)

    @property
    def replaces_feed_forward(self) -> bool:
        return self.persistent_memory > 0


class SparseAttention(Attention):
    """The pattern's layer ``layer`` at sequence length ``seq_len``, computed by the kind's backend."""

    can_decode: ClassVar[bool] = True

    def __init__(self, config: ModelConfig, seq_len: int, layer: int):
        super().__init__(config)
        self.block_size, self.backend = config.pattern.block_size, config.attention.backend
        self.layout = config.pattern.layout(config.n_heads, seq_len, layer)  # for the full context, shared by equal layers
        self.memory = PersistentMemory(config, self.layout) if config.attention.persistent_memory else None
        self._tiles: dict[int, int] = {}  # query blocks -> tiles computed, summed over heads
        if config.compile:  # one eager call in a compiled block: the backends plan in Python, their ops have no fake kernels
            self.forward = torch.compiler.disable(self.forward)

    def forward(self, x: torch.Tensor, cache: BlockKVCache | None = None) -> torch.Tensor:
        """As every kind's, but where the backend takes the fused projection's output as it lies (cpp), q, k, v and
        the output are never copied out of it (``kernels.PACKED``)."""
        packed = None if cache is not None or self.memory is not None else get_packed_backend(self.backend, x.device)
        if packed is None:
            return super().forward(x, cache)
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads)  # (B, N, 3, H, D)
        y = packed(qkv, self.layout.crop(N // self.block_size), self.block_size)  # (B, N, H, D)
        return self.proj(y.reshape(B, N, C))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: BlockKVCache | None) -> torch.Tensor:
        B, H, N, D = q.shape
        if cache is not None:
            if self.memory is not None:
                cache.write(*self.memory.keys_values(B, k.dtype), 0)
            cache.write(k, v, self._offset)
        attend = get_backend(self.backend, q.device)
        if self.memory is not None:
            return self.memory.attend(attend, q, k, v)  # (B, H, N, D)
        # Patterns depend only on absolute positions, so a shorter sequence uses the top-left corner.
        nb = N // self.block_size
        return attend(q, k, v, self.layout.crop(nb), self.block_size)  # (B, H, N, D)

    def new_cache(self) -> BlockKVCache:
        """An empty cache for this layer; persistent memory sits in it as the leading key blocks."""
        return BlockKVCache(self.layout if self.memory is None else self.memory.layout, self.block_size)

    def decode(self, x: torch.Tensor, cache: BlockKVCache, pos: int) -> torch.Tensor:
        q, k, v = self.heads(x)  # (B, H, 1, D) each
        cache.write(k, v, pos + self._offset)
        return self.merge(cache.attend(q, pos + self._offset))

    @property
    def _offset(self) -> int:
        """Cache position of context position 0: after the persistent vectors."""
        return 0 if self.memory is None else self.memory.n_memory

    def attention_flops(self, n: int) -> float:
        """QK^T and AV over every computed tile (whole tiles, the diagonal's masked half included), with the
        persistent memory's key blocks in every row; the backends' padding and memory's dummy rows are not
        model FLOPs."""
        nb = math.ceil(n / self.block_size)
        if nb not in self._tiles:
            tiles = self.layout.crop(nb).nnz
            memory_blocks = 0 if self.memory is None else self.memory.n_memory // self.block_size
            self._tiles[nb] = tiles + self.n_heads * nb * memory_blocks
        head_dim = self.qkv.in_features // self.n_heads
        return 2 * 2 * head_dim * self.block_size**2 * self._tiles[nb]
