"""What a training step will hold at its peak, estimated before the first one: a run that cannot fit is refused in
one line instead of ending, minutes later, in the out-of-memory killer.

Per process, beyond what it holds when the check runs (torch, the model's weights, the layouts), in bytes:

- ``optimizer``: gradients and AdamW's two moments, 12 bytes a parameter (a rank's share under FSDP2);
- ``activations``: what the backward needs, in units of one ``[B, N, d_model]`` fp32 tensor. Without recompute a
  block keeps about 8 + 2 d_ff / d_model units (its norms' inputs, q, k, v and the output, the MLP's hidden layer
  twice); with recompute only its input, and the block being recomputed holds ``RECOMPUTED`` units at the peak of
  its backward. Beside them the step's own: the embeddings, the last block's output and gradients in flight;
- ``attention``: what a backend adds to a layer beyond q, k, v: nothing for cpp, which reads the projection where
  it lies; copies of q, k, v and the output for pieces and for dense SDPA; the gathered keys and the scores of
  blocks; the N x N scores of reference;
- ``loss``: the logits of ``CHUNK`` tokens, their softmax and gradient;
- ``start-up``: what the first step loads once (Dynamo, which recompute's checkpoint imports; the kernel).

The coefficients are measured (``tests/test_memory.py`` holds the estimate to measured peaks: at least the peak,
at most 30% above). The step's FLOPs are the model's own count, 3x forward (4x with recompute).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from sparse_transformer.model.kernels import resolve_backend
from sparse_transformer.model.transformer import CHUNK, SparseTransformer

GiB = 2**30
MiB = 2**20
RECOMPUTED = 9.5  # units a recomputed block and the step around it hold at the peak of its backward (measured)
STEP = 4.0  # units the step holds without recompute beyond its blocks' (embeddings, output, gradients in flight)
BF16_STORED = 0.72  # of the units a step stores without recompute, under bf16 autocast (its linear layers' outputs)
START_UP = 60 * MiB  # what the first step makes once (plans, threads' buffers)
DYNAMO = 175 * MiB  # torch.utils.checkpoint imports Dynamo on its first call (Lightning's import already did)
MARGIN = 1.1  # on the measured coefficients: an estimate errs on the safe side
LONG_STEP_FLOPS = 1e12  # a step of more FLOPs than this (about ten seconds on a laptop's CPU) gets a line first
EFFICIENCY = 0.6  # a step's FLOP/s over a plain matrix product's on a CPU: 0.61 at N = 2^20, bench/results/long-runs-cpu.md


@dataclass(frozen=True)
class StepMemory:
    """The parts of a step's peak, in bytes."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def biggest(self) -> str:
        return max(self.parts, key=self.parts.get)

    def describe(self) -> str:
        """``activations 9.8 GiB, optimizer 0.1 GiB``: the parts of a tenth of a GiB or more, the largest first."""
        parts = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{name} {gib(size)}" for name, size in parts if size >= 0.05 * GiB) or "no part above 0.1 GiB"


def gib(size: float) -> str:
    return f"{size / GiB:,.1f} GiB"


def estimate(model: SparseTransformer, batch: int, shards: int = 1, precision: str = "32-true") -> StepMemory:
    """The peak of one training step of ``model`` on ``batch`` sequences of its context, per process; ``shards``:
    the ranks its parameters, gradients and optimizer state are spread over (FSDP2); ``precision``: Lightning's."""
    config = model.config
    n, C = model.seq_len + -model.seq_len % model.block_size, config.d_model
    unit = 4.0 * batch * n * C
    layers = list(model.all_blocks())
    if config.recompute:
        activations = unit * (RECOMPUTED + len(layers))
    else:
        per_layer = 8 + (2 * config.d_ff / C if not config.attention.replaces_feed_forward else 0)
        activations = unit * (STEP + per_layer * len(layers)) * (BF16_STORED if precision.startswith("bf16") else 1.0)
    parameters = sum(p.numel() for p in model.parameters())
    return StepMemory({
        "activations": MARGIN * activations,
        "attention": MARGIN * sum(attention_extra(block.attn, batch, n) for block in layers[: 1 if config.recompute else None]),
        "optimizer": 12.0 * parameters / shards,
        "loss": MARGIN * 3 * 4.0 * min(batch * n, CHUNK) * config.vocab_size,
        "start-up": START_UP + (DYNAMO if config.recompute and "torch._dynamo" not in sys.modules else 0),
    })  # fmt: skip


def attention_extra(attn: torch.nn.Module, batch: int, n: int) -> float:
    """Bytes a layer's attention backend keeps beyond q, k, v, at ``batch`` sequences of ``n``."""
    layout = getattr(attn, "layout", None)
    if layout is None:  # Performer, adaptive span: their own modules, counted as a layer's activations
        return 0.0
    H, C = attn.n_heads, attn.qkv.in_features
    unit = 4.0 * batch * n * C
    backend = resolve_backend(getattr(attn, "backend", "auto"), torch.device("cpu"))
    if backend == "reference":
        return 3 * 4.0 * batch * H * n * n  # scores, probabilities and their gradient
    if backend == "cpp" and not layout.is_dense and getattr(attn, "memory", None) is None:
        return 0.0
    if backend == "blocks":
        nb = layout.n_blocks
        width = int(layout.counts().max()) if not layout.is_dense else nb
        return 2 * 4.0 * batch * H * n * width * n // nb + 2 * unit * width  # scores and probabilities; gathered keys
    return 4 * unit  # copies of q, k, v and the output (pieces, SDPA for a dense layout, persistent memory)


def available() -> int | None:
    """Bytes a new allocation can take now (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


SHRINK = {  # the option that shrinks each part
    "activations": "set model.network.recompute true, or a shorter data.seq_len or smaller data.batch_size",
    "attention": "use model.network.attention.backend auto (cpp reads q, k, v in place)",
    "optimizer": "use a smaller model, or shard it (--config configs/strategies/fsdp2.yaml)",
    "loss": "a smaller data.batch_size",
    "start-up": "a machine with more memory",
}


def step_flops(model: SparseTransformer, batch: int) -> float:
    """FLOPs of one training step: the model's forward count, 3x for forward and backward, 4x with recompute."""
    return (4 if model.config.recompute else 3) * batch * model.seq_len * model.flops_per_token()


def gemm_rate() -> float:
    """FLOP/s of an fp32 matrix product of a training step's shape on this CPU now, measured in about 0.1 s."""
    a, b = torch.randn(4096, 256), torch.randn(256, 1024)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < 0.1:
        a @ b
        count += 1
    return count * 2 * 4096 * 256 * 1024 / elapsed


def duration(seconds: float) -> str:
    """``45 s``, ``9 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
