"""Parameters and training-step time of the architecture options at equal depth: flat, all-attention, Hourglass.

    python bench/architecture.py --device cpu --seq-len 2048 --layers 8

Each row is a whole SparseTransformer (embedding, blocks, head) with the same pattern, width and number of
blocks; only the arrangement differs. It times forward and forward+backward (loss on random bytes) as the
median of ``--reps`` rounds after one warm-up round, each round running every model once (so a noisy moment
on a shared machine hits all rows alike), and writes a Markdown table with the command that made it to
bench/results/architecture-<device>.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.machine import device_name  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.model import AttentionPattern, HourglassConfig, ModelConfig, Sparse, SparseTransformer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=8, help="blocks in every model")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--memory", type=int, default=64, help="persistent vectors per head for the all-attention rows")
    p.add_argument("--specs", nargs="+", default=["2@1 4@2 2@1", "2@1 4@4 2@1", "1@1 2@2 2@4 2@2 1@1"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for torch")
    p.add_argument("--out", type=Path, help="default: bench/results/architecture-<device>.md")
    return p.parse_args()


def variants(args: argparse.Namespace) -> dict[str, dict]:
    memory = Sparse(persistent_memory=args.memory)
    rows = {"flat": {}, f"all-attention, M={args.memory}": {"attention": memory}}
    for spec in args.specs:
        rows[f"hourglass {spec}"] = {"hourglass": HourglassConfig(spec)}
    rows[f"hourglass {args.specs[0]} + all-attention"] = {
        "hourglass": HourglassConfig(args.specs[0]),
        "attention": memory,
    }
    return rows


def elapsed_ms(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    args = parse_args()
    pattern = AttentionPattern("strided", block_size=args.block_size, stride=args.stride, heads="split")
    x = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=args.device)
    torch.set_num_threads(args.threads)
    models = {}
    for name, extra in variants(args).items():
        torch.manual_seed(0)
        config = ModelConfig(
            seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, pattern=pattern, **extra
        )
        models[name] = SparseTransformer(config).to(args.device)

    def forward(model: SparseTransformer) -> None:
        with torch.no_grad():
            model(x[:, :-1])

    def forward_backward(model: SparseTransformer) -> None:
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    times = {name: ([], []) for name in models}
    for rep in range(args.reps + 1):  # round 0 is the warm-up (layout tables, allocator)
        for name, model in models.items():
            fwd = elapsed_ms(functools.partial(forward, model), args.device)
            fwd_bwd = elapsed_ms(functools.partial(forward_backward, model), args.device)
            if rep:
                times[name][0].append(fwd)
                times[name][1].append(fwd_bwd)
    rows = [(name, models[name].num_params(), statistics.median(f), statistics.median(fb)) for name, (f, fb) in times.items()]
    for name, params, fwd, fwd_bwd in rows:
        print(f"{name:45s} {params:>10,d} params  fwd {fwd:8.1f} ms  fwd+bwd {fwd_bwd:8.1f} ms")

    device = device_name(args.device)
    base = rows[0][3]
    lines = [
        f"# Architecture options at equal depth on {device}",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}",
        f"- every model: {args.layers} blocks, d_model={args.d_model}, {args.heads} heads, N={args.seq_len}, batch {args.batch}, fp32,",
        f"  {pattern}, default backend",
        f"- median of {args.reps} rounds after a warm-up round, every model once per round; forward+backward includes the loss",
        "",
        "| model | parameters | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs flat |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {p:,} | {f:.1f} | {fb:.1f} | {base / fb:.2f}x |" for n, p, f, fb in rows]
    out = args.out or Path(__file__).resolve().parent / "results" / f"architecture-{args.device}.md"
    write_atomic(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
