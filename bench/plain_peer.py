"""The dense peer of bench/peers.py as a user's plain script trains it: torch and x-transformers, nothing of ours,
no Lightning.

    python bench/plain_peer.py --text sparse_transformer/data/corpus/python_reference.txt --seq-len 256 --batch 16 --steps 200

bench/peers.py runs it in a process of its own to read the memory a user of the peer sees: the whole process's
resident peak, and its working memory (that peak less the process's size once torch and x-transformers were
imported). It trains as bench/peers.py's peer does: random windows of the text's first 90% (the training
split), AdamW with decay on matrices only (fused), clipping at 1.0, the seed; the lr stays constant (a schedule
costs neither memory nor time). Prints one line of JSON: tokens/s, the median step, the memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.rss: the standard library only

from bench.rss import current_rss, peak_rss  # noqa: E402


def build_peer(seq_len: int, d_model: int, n_layers: int, n_heads: int, ffn_mult: float) -> torch.nn.Module:
    """x-transformers' dense decoder of our size: heads of d_model / n_heads (its default is 64), flash SDPA."""
    from x_transformers import Decoder, TransformerWrapper  # here: the benches that import this run without it

    layers = Decoder(
        dim=d_model, depth=n_layers, heads=n_heads, attn_dim_head=d_model // n_heads, ff_mult=ffn_mult, attn_flash=True
    )
    return TransformerWrapper(num_tokens=256, max_seq_len=seq_len, attn_layers=layers)


def next_byte_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])  # (B, N, 256)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, required=True, help="a file of raw bytes")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--skip", type=int, default=5, help="first steps not timed")
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn-mult", type=float, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    if args.steps <= args.skip:
        p.error(f"--steps {args.steps} must exceed --skip {args.skip}")
    import x_transformers  # noqa: F401  (before the baseline: what a script of the peer imports)

    base = current_rss()
    torch.manual_seed(args.seed)
    text = torch.frombuffer(bytearray(args.text.read_bytes()), dtype=torch.uint8)
    train = text[: int(0.9 * len(text))].long()
    model = build_peer(args.seq_len, args.d_model, args.layers, args.heads, args.ffn_mult).train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.01}, {"params": others, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        starts = torch.randint(len(train) - args.seq_len - 1, (args.batch,))
        batch = torch.stack([train[s : s + args.seq_len + 1] for s in starts.tolist()])  # (B, N + 1)
        loss = next_byte_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    peak = peak_rss()
    timed = times[args.skip :]
    row = {
        "tokens_per_s": args.batch * args.seq_len * len(timed) / sum(timed),
        "step_ms": {"total": 1e3 * statistics.median(timed)},
        "base_mib": base / 2**20,
        "peak_mib": peak / 2**20,
        "growth_mib": (peak - base) / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
