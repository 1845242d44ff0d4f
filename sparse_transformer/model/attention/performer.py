"""Performer / FAVOR+ (Choromanski et al. 2020): softmax attention through positive orthogonal random features.

exp(q·k) = E_w[phi(q)·phi(k)] with phi(x) = exp(w·x - |x|²/2), w ~ N(0, I): the attention matrix becomes
phi(Q) phi(K)^T, so causal attention is a prefix sum over keys of phi(k_j) v_j^T, an (m, D) state per head,
and no N×N matrix is ever formed. The m feature vectors are drawn in orthogonal blocks (lower variance than
i.i.d. draws), redrawn every ``redraw_every`` training steps and kept as a buffer, so a checkpoint samples
with the features it was validated with.

Causal prefix sums run over chunks of ``chunk_size`` queries: inside a chunk a (C, C) masked product, across
chunks the carried state; memory is O(N·m + C² + m·D) per head (the backward keeps one (m, D) state per
chunk, O(N/C·m·D)). Numerical stability (the paper subtracts max_f from the exponents): every query
subtracts its own max over features, which cancels in the normaliser; keys subtract the running max over
the features of the keys so far (a causal cummax, carried across chunks like online softmax), which also
cancels exactly and never lets a later key change an earlier output. Feature maps and sums run in fp32
whatever the input dtype, so bf16/fp16 training is stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparse_transformer.model.attention.base import Attention
from sparse_transformer.model.config import AttentionKind, ConfigError, ModelConfig


@dataclass(frozen=True)
class Performer(AttentionKind):
    """FAVOR+ attention: ``attention: {class_path: Performer, init_args: {features: 64}}``. It is global causal
    attention, so the pattern must be dense.

    Args:
        features: m, random features per head; the approximation error falls as 1/sqrt(m).
        redraw_every: draw new features every k training steps (0: never); never in evaluation.
        chunk_size: queries per prefix-sum chunk; trades the (C, C) intra-chunk product against loop length.
    """

    features: int = 128
    redraw_every: int = 1000
    chunk_size: int = 64
    name: ClassVar[str] = "performer"

    def __post_init__(self) -> None:
        if self.features < 1:
            raise ConfigError(f"performer features={self.features} must be >= 1")
        if self.redraw_every < 0:
            raise ConfigError(f"performer redraw_every={self.redraw_every} must be >= 0 (0 = never)")
        if self.chunk_size < 1:
            raise ConfigError(f"performer chunk_size={self.chunk_size} must be >= 1")

    def check(self, config: ModelConfig) -> None:
        if config.pattern.kind != "dense":
            raise ConfigError(
                f"attention 'performer' is global causal linear attention; pattern.kind={config.pattern.kind!r} "
                "cannot restrict it (use pattern.kind: dense)"
            )

    def build(self, config: ModelConfig, seq_len: int, layer: int) -> PerformerAttention:
        return PerformerAttention(config, seq_len, layer)


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[m, d]`` rows with Gaussian norms, orthogonal within each block of d rows (the paper's ORF)."""
    blocks = []
    for start in range(0, m, d):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=generator))
        q = q * r.diagonal().sign()  # Haar-distributed: without this, QR fixes the signs and biases directions
        blocks.append(q.T[: min(d, m - start)])
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)  # chi(d): N(0, I) row lengths
    return torch.cat(blocks) * norms


def positive_features(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponents w·x - |x|²/2 of phi(x), split as (exp(e - s), s) with s = max over features (no overflow)."""
    e = x @ w.T - x.pow(2).sum(-1, keepdim=True) / 2  # (B, H, N, m)
    s = e.amax(-1, keepdim=True).detach()  # constant per row: cancels, so no gradient is lost
    return torch.exp(e - s), s.squeeze(-1)


def favor_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, chunk: int) -> torch.Tensor:
    """Causal FAVOR+ attention: q, k, v ``(B, H, N, D)``, features w ``(m, D)``; returns ``(B, H, N, D)`` in fp32."""
    B, H, N, D = q.shape
    scale = D**-0.25  # exp(q·k / sqrt(D)) = exp(q'·k') with q' = q·D^-1/4, k' = k·D^-1/4
    q, k, v, w = q.float() * scale, k.float() * scale, v.float(), w.float()
    phi_q, _ = positive_features(q, w)  # the query's own stabiliser cancels between numerator and denominator
    phi_k, s_k = positive_features(k, w)  # (B, H, N, m), (B, H, N)
    run_max = s_k.cummax(-1).values  # (B, H, N): stabiliser of query i = max over keys j <= i
    state = q.new_zeros(B, H, w.shape[0], D)  # sum_j exp(s_j - ref) phi_k_j v_j^T over earlier chunks
    norm = q.new_zeros(B, H, w.shape[0])  # sum_j exp(s_j - ref) phi_k_j
    ref = s_k[..., :1]  # (B, H, 1): reference exponent of state and norm
    out = []
    for a in range(0, N, chunk):
        sl = slice(a, min(a + chunk, N))
        fq, fk, vc, sk, mi = phi_q[:, :, sl], phi_k[:, :, sl], v[:, :, sl], s_k[:, :, sl], run_max[:, :, sl]
        n = fq.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        # exp(s_j - M_i) <= 1 for j <= i; masked to exactly 0 above the diagonal before exp, so no inf * 0.
        decay = torch.exp((sk.unsqueeze(-2) - mi.unsqueeze(-1)).masked_fill(~causal, float("-inf")))  # (B,H,n,n)
        scores = (fq @ fk.transpose(-1, -2)) * decay  # (B, H, n, n)
        carry = torch.exp(ref - mi).unsqueeze(-1)  # (B, H, n, 1): state rescaled to each query's stabiliser
        num = scores @ vc + carry * (fq @ state)  # (B, H, n, D)
        den = scores.sum(-1, keepdim=True) + carry * (fq @ norm.unsqueeze(-1))  # (B, H, n, 1)
        out.append(num / den.clamp_min(torch.finfo(torch.float32).tiny))
        new_ref = mi[..., -1:]  # running max at the chunk's last key
        wk = fk * torch.exp(sk - new_ref).unsqueeze(-1)  # (B, H, n, m)
        rescale = torch.exp(ref - new_ref)  # (B, H, 1), <= 1
        state = rescale.unsqueeze(-1) * state + wk.transpose(-1, -2) @ vc
        norm = rescale * norm + wk.sum(-2)
        ref = new_ref
    return torch.cat(out, dim=2)


class PerformerAttention(Attention):
    """Multi-head causal attention with FAVOR+: global (the pattern must be dense), no N x N matrix."""

    def __init__(self, config: ModelConfig, seq_len: int, layer: int):
        super().__init__(config)
        self.options = config.attention
        # The features and the seed they are drawn from are state: saved in checkpoints, restored on resume.
        self.register_buffer("seed", torch.randint(0, 2**62, ()))
        self.register_buffer("features", orthogonal_gaussian(self.options.features, config.head_dim))  # (m, D)

    @torch.no_grad()
    def redraw(self, step: int) -> None:
        """New features for training step ``step``, drawn from (seed, step): a resumed run draws the same ones."""
        g = torch.Generator().manual_seed(int(self.seed) + step)
        self.features.copy_(orthogonal_gaussian(*self.features.shape, generator=g))

    def before_step(self, step: int) -> None:
        """Redraw when ``step`` is a positive multiple of ``redraw_every``, in training mode only."""
        every = self.options.redraw_every
        if self.training and every and step > 0 and step % every == 0:
            self.redraw(step)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: None) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):
            return favor_causal(q, k, v, self.features, self.options.chunk_size).to(q.dtype)  # (B, H, N, D)

    def attention_flops(self, n: int) -> float:
        """The matmuls of :func:`favor_causal`, per head: the feature maps of q and k, then per chunk of c
        queries the (c, c) products with phi(k) and v, the carried state's product, normaliser and update."""
        m, D, chunk = self.features.shape[0], self.features.shape[1], self.options.chunk_size
        features = 2 * 2 * n * D * m
        chunks = sum(2 * c * c * (m + D) + 2 * c * m * (2 * D + 1) for c in _chunk_lengths(n, chunk))
        return self.n_heads * (features + chunks)


def _chunk_lengths(n: int, chunk: int) -> list[int]:
    return [min(chunk, n - a) for a in range(0, n, chunk)]

