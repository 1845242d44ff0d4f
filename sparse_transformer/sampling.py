"""Autoregressive sampling from a trained model, incremental with a key/value cache or by full recompute."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from sparse_transformer.errors import InputError

if TYPE_CHECKING:
    from sparse_transformer.modality import Modality
    from sparse_transformer.model import SparseTransformer


@torch.no_grad()
def generate(
    model: SparseTransformer,
    prompt: torch.Tensor,
    length: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
) -> torch.Tensor:
    """Extend ``prompt`` ``[B, T]`` by ``length`` tokens; returns ``[B, T + length]``.

    With ``kv_cache`` each new token costs one position per layer (keys read only where the pattern
    allows); without, or for a model that cannot decode incrementally, every step re-runs the whole
    prefix. Both give the same tokens. ``temperature == 0`` is greedy.
    """
    check_request(model, prompt, length, temperature, top_k)
    model.eval()
    kv_cache = kv_cache and model.supports_kv_cache
    out = prompt
    if kv_cache:
        caches = model.new_caches()
        logits = model(prompt, caches)[:, -1]
    for pos in range(prompt.shape[1], prompt.shape[1] + length):
        if not kv_cache:
            logits = model(out)[:, -1]
        nxt = pick(logits.float(), temperature, top_k, generator)  # (B, 1)
        out = torch.cat([out, nxt], dim=1)
        if kv_cache and pos + 1 < prompt.shape[1] + length:
            logits = model.decode(nxt, pos, caches)
    return out


def sample(
    model: SparseTransformer,
    modality: Modality,
    num_samples: int,
    length: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    prompt: bytes | None = None,
    kv_cache: bool = True,
) -> torch.Tensor:
    """``num_samples`` samples ``[S, T]`` as the modality's data, each starting from ``modality.first_tokens``
    (a text prompt is kept in the output; the start token of images and audio is dropped)."""
    first = modality.first_tokens(prompt)
    start = torch.tensor(first, device=model.head.weight.device).repeat(num_samples, 1)  # (S, T0)
    return modality.strip(generate(model, start, length, temperature, top_k, generator, kv_cache))


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per row of ``[B, vocab]`` logits; argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def check_request(model: SparseTransformer, prompt: torch.Tensor, length: int, temperature: float, top_k: int | None) -> None:
    """Refuse what the model cannot do, before any work: one line naming the value and what is allowed."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise InputError(f"prompt has shape {list(prompt.shape)}; give at least one token per sample ([B, T], T >= 1)")
    vocab = model.head.out_features
    if prompt.min() < 0 or prompt.max() >= vocab:
        bad = prompt[(prompt < 0) | (prompt >= vocab)][0].item()
        raise InputError(f"prompt token {bad} is outside the model's vocabulary 0..{vocab - 1}")
    if length < 1:
        raise InputError(f"length={length} must be >= 1")
    # The last token is sampled, never fed back: the model reads at most prompt + length - 1 positions.
    if prompt.shape[1] + length - 1 > model.seq_len:
        raise InputError(
            f"prompt of {prompt.shape[1]} tokens + length {length} needs a context of {prompt.shape[1] + length - 1} "
            f"positions, more than the model's seq_len={model.seq_len}; shorten the prompt or the length"
        )
    check_sampling(temperature, top_k)


def check_sampling(temperature: float, top_k: int | None) -> None:
    """Refuse a temperature or top-k that sampling cannot use."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature={temperature} must be a number >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k={top_k} must be >= 1 (or left out: every token)")
