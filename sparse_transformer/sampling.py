"""Autoregressive sampling from a trained model, of any length, incremental with a key/value cache.

The model reads at most ``seq_len`` positions. Once the context is full, the window of tokens it reads slides
forward by ``slide`` tokens, a whole number of blocks so the pattern's tiles stay aligned, and the cache is
filled again from the tokens it keeps (one prefill); between slides every token costs one position per layer.
A window starting at token ``w`` holds tokens ``w ..`` at positions ``0 ..``, as the model saw random windows
of the data in training. Recomputing the whole window for every token (``kv_cache=False``) gives the same
tokens: it is the reference the cache is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparse_transformer.errors import InputError
from sparse_transformer.modality import Modality
from sparse_transformer.model import SparseTransformer


class NonFiniteLogits(InputError):
    """The model's outputs are not finite: there is nothing to draw from."""


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn.

    Args:
        temperature: divides the logits; 0 is greedy.
        top_k: sample among the k likeliest tokens only; None: all.
        seed: seeds the sampling generator: the same seed gives the same tokens.
        kv_cache: decode incrementally where the model can (else every token recomputes its window).
        slide: tokens the window moves by once the context is full, rounded down to whole blocks; None: a
            quarter of the context. Larger slides mean fewer prefills, and less context right after each.
    """

    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    kv_cache: bool = True
    slide: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature={self.temperature} must be a number >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k={self.top_k} must be >= 1 (or left out: every token)")
        if self.slide is not None and self.slide < 1:
            raise InputError(f"slide={self.slide} must be >= 1 token")


def window_start(tokens: int, seq_len: int, shift: int) -> int:
    """First token of the window the model reads to predict token ``tokens`` (0-based): the last ``seq_len`` at
    most, its start a multiple of ``shift``."""
    return 0 if tokens <= seq_len else shift * math.ceil((tokens - seq_len) / shift)


def slide_of(model: SparseTransformer, slide: int | None) -> int:
    """The window's step in tokens: whole blocks, at least one, at most the context."""
    bs = model.block_size
    tokens = model.seq_len // 4 if slide is None else slide
    return min(max(bs, tokens // bs * bs), model.seq_len // bs * bs)


@torch.no_grad()
def generate(
    model: SparseTransformer,
    prompt: torch.Tensor,
    length: int,
    sampling: Sampling = Sampling(),
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Extend ``prompt`` ``[B, T]`` by ``length`` tokens, of any length; returns ``[B, T + length]``.

    ``progress(n)`` is called after each of the n tokens.
    """
    check_request(model, prompt, length)
    model.eval()
    generator = torch.Generator().manual_seed(sampling.seed)
    cached = sampling.kv_cache and model.supports_kv_cache
    shift = slide_of(model, sampling.slide)
    t0 = prompt.shape[1]
    out = prompt.new_empty(prompt.shape[0], t0 + length)
    out[:, :t0] = prompt
    caches, start = None, None
    for t in range(t0, t0 + length):  # predict token t from tokens [0, t)
        w = window_start(t, model.seq_len, shift)
        if not cached:
            logits = model(out[:, w:t])[:, -1]
        elif w != start:  # a new window: fill the cache from the tokens it keeps
            caches, start = model.new_caches(), w
            logits = model(out[:, w:t], caches)[:, -1]
        else:
            logits = model.decode(out[:, t - 1 : t], t - 1 - start, caches)
        out[:, t : t + 1] = pick(logits.float(), sampling, generator)
        if progress is not None:
            progress(t - t0 + 1)
    return out


def sample(
    model: SparseTransformer,
    modality: Modality,
    num_samples: int,
    length: int,
    sampling: Sampling = Sampling(),
    prompt: list[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``num_samples`` samples ``[S, T]`` as the modality's data, each starting from ``prompt`` (default: the
    modality's first tokens); a text prompt is kept in the output, the start token of images and audio is not."""
    first = modality.prompt() if prompt is None else prompt
    start = torch.tensor(first, device=model.head.weight.device).repeat(num_samples, 1)  # (S, T0)
    return modality.strip(generate(model, start, length, sampling, progress))


def complete(model: SparseTransformer, originals: torch.Tensor, kept: int, sampling: Sampling = Sampling()) -> torch.Tensor:
    """``originals`` ``[n, T]`` with all but their first ``kept`` tokens generated anew: image completion keeps
    the top half of each image and draws the rest. Returns ``[n, T]``."""
    if len(originals) < 1:
        raise InputError("nothing to complete: give at least one image")
    originals = originals.to(model.head.weight.device)
    return generate(model, originals[:, :kept], originals.shape[1] - kept, sampling)


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``[B, vocab]`` logits; argmax at temperature 0."""
    if sampling.temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    if not torch.isfinite(probs).all():  # checked on the copy the draw needs anyway: no extra device sync
        raise NonFiniteLogits("the model's next-token probabilities are not finite (NaN or inf): its weights or activations overflowed")
    return torch.multinomial(probs, 1, generator=generator).to(logits.device)


def check_request(model: SparseTransformer, prompt: torch.Tensor, length: int) -> None:
    """Refuse what the model cannot do, before any work: one line naming the value and what is allowed."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise InputError(f"prompt has shape {list(prompt.shape)}; give at least one token per sample ([B, T], T >= 1)")
    vocab = model.head.out_features
    if prompt.min() < 0 or prompt.max() >= vocab:
        bad = prompt[(prompt < 0) | (prompt >= vocab)][0].item()
        raise InputError(f"prompt token {bad} is outside the model's vocabulary 0..{vocab - 1}")
    if length < 1:
        raise InputError(f"length={length} must be >= 1")
