"""Activation recomputation: peak training memory and step time with ``recompute`` off and on, same run.

    python bench/recompute.py                                  # CUDA: 30 layers, d=512, N=8192, bf16 autocast
    python bench/recompute.py --device cpu --layers 16 --d-model 256 --seq-len 2048

Each case runs one forward+backward of the same model and batch in a fresh process, so the peak of one
cannot hide in the other's. Memory above the model and optimizer: on CUDA ``torch.cuda.max_memory_allocated``
minus the allocation before the step; on CPU the peak resident set (VmHWM) minus the resident set
before the step. The table and the command are written to bench/results/recompute-<device>.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.machine import device_name  # noqa: E402
from bench.rss import current_rss, peak_rss, reset_peak  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.model import AttentionPattern, ModelConfig, SparseTransformer  # noqa: E402


def measure(args: argparse.Namespace, recompute: bool) -> dict[str, float]:
    """One training step; returns memory above the resident model (MiB) and the step's time (s)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    pattern = AttentionPattern(args.pattern, block_size=args.block_size, stride=args.stride, heads="split")
    config = ModelConfig(
        seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, pattern=pattern, recompute=recompute
    )
    model = SparseTransformer(config).to(device)
    idx = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(idx: torch.Tensor) -> None:
        with autocast:
            logits = model(idx[:, :-1])  # (B, N, 256)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten()).backward()

    step(idx[:, : 2 * args.block_size + 1])  # load the code paths and allocate .grad on a short sequence first
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()
        before = current_rss() / 2**20
    start = time.perf_counter()
    step(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss() / 2**20
    return {"memory_mib": peak - before, "step_s": time.perf_counter() - start, "params": model.num_params()}


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pattern", default="strided", choices=["strided", "fixed", "local", "dense"])
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--case", choices=["off", "on"], help=argparse.SUPPRESS)  # internal: one case per process
    p.add_argument("--out", type=Path, help="default: bench/results/recompute-<device>.md")
    args = p.parse_args()
    if args.case:
        print(json.dumps(measure(args, recompute=args.case == "on")))
        return

    results = {}
    for case in ("off", "on"):
        run = subprocess.run([sys.executable, *sys.argv, "--case", case], capture_output=True, text=True, check=True)
        results[case] = json.loads(run.stdout.splitlines()[-1])
        print(f"recompute {case}: {results[case]['memory_mib']:.0f} MiB, {results[case]['step_s']:.2f} s")
    off, on = results["off"], results["on"]
    device = device_name(args.device)
    lines = [
        f"# Activation recomputation on {device}",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}",
        f"- model: {args.layers} layers, d={args.d_model}, {args.heads} heads, {off['params'] / 1e6:.1f}M parameters, "
        f"{args.pattern} pattern (block {args.block_size}, stride {args.stride}); batch {args.batch} x N={args.seq_len}",
        "- memory: above the model's weights, one forward+backward "
        + ("(max_memory_allocated, bf16 autocast)" if args.device == "cuda" else "(peak RSS minus RSS before the step, fp32)"),
        "",
        "| recompute | memory MiB | step s |",
        "|---|---:|---:|",
        f"| off | {off['memory_mib']:.0f} | {off['step_s']:.2f} |",
        f"| on | {on['memory_mib']:.0f} | {on['step_s']:.2f} |",
        f"| on / off | {on['memory_mib'] / off['memory_mib']:.2f} | {on['step_s'] / off['step_s']:.2f} |",
        "",
    ]
    out = args.out or Path(__file__).resolve().parent / "results" / f"recompute-{args.device}.md"
    write_atomic(out, "\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
