"""Benchmark sampling: tokens/s with the key/value cache against re-running the whole prefix every step.

    python bench/sampling.py                                  # CPU or CUDA, N = 1024 2048 4096
    python bench/sampling.py --seq-lens 512 --new-tokens 16   # quick

The model is random (speed does not depend on the weights): the quickstart's width and depth by default.
Each row primes with ``N - new_tokens`` tokens and generates ``new_tokens``, so both methods decode at the end
of the context where sampling is slowest. The cache's prefill (one forward pass over the prompt, paid once per
sample) is timed on its own and not counted in its tokens/s; "cached blocks" is how many key blocks per layer
the cache holds at the end, out of N / block_size.
The table is printed and written as Markdown, with the command, to bench/results/sampling-<device>.md.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.model import AttentionPattern, ModelConfig, SparseTransformer  # noqa: E402
from sparse_transformer.sampling import generate  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/sampling-<device>.md")
    return p.parse_args()


def decode(model: SparseTransformer, token: torch.Tensor, positions: range, caches: list) -> None:
    for pos in positions:
        model.decode(token, pos, caches)


@torch.no_grad()
def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    patterns = {
        "dense": AttentionPattern("dense", block_size=args.block_size),
        "strided": AttentionPattern("strided", block_size=args.block_size, stride=args.stride, heads="split"),
        "fixed": AttentionPattern("fixed", block_size=args.block_size, stride=args.stride, summary=args.block_size),
    }
    rows = []
    for n in args.seq_lens:
        for name, pattern in patterns.items():
            torch.manual_seed(0)
            config = ModelConfig(seq_len=n, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, pattern=pattern)
            model = SparseTransformer(config)
            model = model.to(args.device).eval()
            prompt = torch.randint(0, 256, (args.batch, n - args.new_tokens), device=args.device)
            caches = model.new_caches()
            prefill = timed(partial(model, prompt, caches), args.device)
            cached = timed(partial(decode, model, prompt[:, -1:], range(n - args.new_tokens, n), caches), args.device)
            recompute = timed(partial(generate, model, prompt, args.new_tokens, 0.0, kv_cache=False), args.device)
            tok = args.batch * args.new_tokens
            blocks = f"{caches[0].stored_blocks()} / {n // args.block_size}"
            rows.append((n, name, prefill * 1e3, tok / cached, tok / recompute, recompute / cached, blocks))
            print(f"N={n} {name}: cached {tok / cached:.1f} tok/s, recompute {tok / recompute:.1f} tok/s", flush=True)
    write(args, rows)


def write(args: argparse.Namespace, rows: list[tuple]) -> None:
    cpu = f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    lines = [
        f"# Sampling: key/value cache vs full recompute on {device}",
        "",
        f"- command: `python bench/sampling.py {shlex.join(sys.argv[1:])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}",
        f"- model: d_model={args.d_model}, {args.layers} layers, {args.heads} heads, block {args.block_size}, "
        f"stride {args.stride}, batch {args.batch}, float32, default attention backend; greedy; "
        f"{args.new_tokens} tokens generated at the end of the context",
        "",
        "| N | pattern | prefill ms | cached decode tok/s | recompute tok/s | speed-up | cached blocks / layer |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n, name, prefill, cached, recompute, ratio, blocks in rows:
        lines.append(f"| {n} | {name} | {prefill:.0f} | {cached:.1f} | {recompute:.1f} | {ratio:.1f}x | {blocks} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or Path(__file__).parent / "results" / f"sampling-{args.device.split(':')[0]}.md"
    write_atomic(out, text)


if __name__ == "__main__":
    main()
