"""Autoregressive sampling from a trained model."""

from __future__ import annotations

import torch

from sparse_transformer.model import SparseTransformer


@torch.no_grad()
def generate(
    model: SparseTransformer,
    prompt: torch.Tensor,
    length: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``prompt`` ``[B, T]`` by ``length`` tokens; returns ``[B, T + length]``.

    Each step re-runs the model on the last ``seq_len`` tokens. With ``temperature == 0`` it is greedy.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    model.eval()
    out = prompt
    for _ in range(length):
        logits = model(out[:, -model.seq_len :])[:, -1].float()  # (B, vocab)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(out.device)
        out = torch.cat([out, nxt], dim=1)
    return out
