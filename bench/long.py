"""One training step at the paper's lengths: time and memory per token from N = 4,096 to 1,048,576, sparse and dense.

    pip install -e '.[peers,bench]'
    python bench/long.py                                        # N = 4k, 16k, 65k, 262k, 1M; every side
    python bench/long.py --seq-lens 4096 16384 --sides sparse peer   # a quick look

Each side is the quickstart's size (4 layers, d=192, 6 heads, feed-forward 4x), batch 1, one AdamW step with
clipping at 1.0 on random bytes, fp32:

- ``sparse``: ours with the README's text pattern: fixed, heads split, stride about sqrt(64 N) in blocks of 64,
  summary 32; factorized positions beyond 8,192 (``config.default_positions``); recompute from N = 65,536, as the
  long configs have it (below, it costs a third more compute for memory a step does not need);
- ``sparse-bf16``: the same under bf16 autocast (the linear layers in bf16; the kernel computes in fp32);
- ``dense``: ours with the dense pattern (the cpp backend calls PyTorch's causal flash SDPA), recompute as ours;
- ``peer``: x-transformers' dense decoder of ``bench/peers.py`` (flash SDPA), in a process that imports only torch
  and x-transformers, as a user's plain script (``bench/plain_peer.py``'s model and loss).

Every (side, N) is a process of its own, so its peak is its own: a warm-up step where N <= 65,536, then the timed
step (beyond, the one step is timed: it includes building the layout's plans, a few seconds of many minutes). A
dense side stops before the first N at which its step, extrapolated from the last N as N^2, would take over
``--max-step-s``; the record says where and what the extrapolation gave. Reported per row: the step's time per
token, and the peak working memory per token (the process's resident peak less its size once imported).
Slopes are least-squares fits of log time per token on log N: 1 for attention that is all of a dense step,
0.5 for the sqrt(N) keys a sparse query reads, 0 for the linear layers.

Written with the command, the CPU and the load to ``bench/results/long-cpu.md``, with a log-log plot.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.rss import current_rss, peak_rss  # noqa: E402  (the standard library only: children import no more)

SIZE = {"d_model": 192, "n_layers": 4, "n_heads": 6, "ffn_mult": 4.0}
BLOCK, SUMMARY = 64, 32
RECOMPUTE_FROM = 65536  # ours recomputes activations from this N, as the long configs do
SIDES = ("sparse", "sparse-bf16", "dense", "peer")
DENSE = ("dense", "peer")  # sides whose step grows as N^2
LABELS = {
    "sparse": "ours, fixed split (fp32)",
    "sparse-bf16": "ours, fixed split (bf16 autocast)",
    "dense": "ours, dense pattern (flash SDPA)",
    "peer": "x-transformers (dense, flash SDPA)",
}


def stride(n: int) -> int:
    """The README's text stride: about sqrt(N * block) in whole blocks, at most N."""
    return min(n, BLOCK * max(1, round(math.sqrt(BLOCK * n) / BLOCK)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--max-step-s", type=float, default=600.0, help="a dense side stops where a step would take longer")
    p.add_argument("--warmup-max-n", type=int, default=65536, help="above this N the one step is the timed one")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long-cpu.md")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seq_len, args.steps)))
        return
    rows, stops = run(args)
    write_results(args, rows, stops)


def run(args: argparse.Namespace) -> tuple[list[dict], dict[str, str]]:
    """Every side at every N, each in its own process; a dense side stops where its next step would be too long."""
    rows, stops = [], {}
    for side in args.sides:
        last: dict | None = None
        for n in sorted(args.seq_lens):
            if side in DENSE and last is not None:
                predicted = last["step_s"] * (n / last["n"]) ** 2
                if predicted > args.max_step_s:
                    stops[side] = (f"stopped before N={n:,}: a step extrapolated from N={last['n']:,} as N^2 would take "
                                   f"{predicted / 60:.0f} min, over the {args.max_step_s / 60:.0f} min limit")  # fmt: skip
                    break
            steps = 2 if n <= args.warmup_max_n else 1
            command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--seq-len", str(n), "--steps", str(steps)]
            print(f"{side} N={n:,} ...", file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["?"])[-1]
                stops[side] = f"failed at N={n:,} (exit {done.returncode}: {tail})"
                break
            last = json.loads(done.stdout.strip().splitlines()[-1]) | {"side": side, "n": n}
            rows.append(last)
            print(f"  {last['step_s']:.1f} s, {last['working'] / 2**20:,.0f} MiB working", file=sys.stderr, flush=True)
    return rows, stops


def child(side: str, n: int, steps: int) -> dict:
    """One side's steps at length n in this process: time of the last, memory over the whole process."""
    if side == "peer":
        import torch
        import x_transformers  # noqa: F401  (imported before the baseline, as a script would)

        base = current_rss()
        from bench.plain_peer import build_peer, next_byte_loss

        model = build_peer(n, SIZE["d_model"], SIZE["n_layers"], SIZE["n_heads"], SIZE["ffn_mult"])
        loss_of = lambda batch: next_byte_loss(model, batch)  # noqa: E731
        autocast = False
    else:
        from sparse_transformer import allocator, threads

        threads.configure()  # as train.py does
        import torch

        base = current_rss()
        model = our_model(n, dense=side == "dense")
        allocator.configure(4 * n * SIZE["d_model"])  # as train.py does
        loss_of = lambda batch: model(batch[:, :-1], targets=batch[:, 1:])  # noqa: E731
        autocast = side == "sparse-bf16"
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.01}, {"params": others, "weight_decay": 0.0}], lr=1e-3, fused=True
    )
    batch = torch.randint(0, 256, (1, n + 1), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {
        "step_s": seconds,
        "loss": loss.item(),
        "params": params,
        "base": base,
        "peak": peak_rss(),
        "working": peak_rss() - base,
    }


def our_model(n: int, dense: bool = False):
    """Ours at length n, as the sparse sides train it (fixed pattern, heads split), or with the dense pattern."""
    from sparse_transformer.model import AttentionPattern, ModelConfig, SparseTransformer

    if dense:
        pattern = AttentionPattern("dense", block_size=BLOCK)
    else:
        pattern = AttentionPattern("fixed", block_size=BLOCK, stride=stride(n), summary=SUMMARY, heads="split")
    return SparseTransformer(ModelConfig(**SIZE, pattern=pattern, recompute=n >= RECOMPUTE_FROM, seq_len=n))


def step_flops_per_token(n: int) -> float:
    """A sparse side's training step in FLOPs per token (``training/memory.step_flops``)."""
    from sparse_transformer.training.memory import step_flops

    return step_flops(our_model(n), batch=1) / n


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log y on log x; None with fewer than two points."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summary_lines(rows: list[dict]) -> list[str]:
    """The issue's targets, each from rows of this run, or why it cannot be said."""
    at = {(r["side"], r["n"]): r for r in rows}
    out = []

    def ratio(a: tuple, b: tuple, key) -> float | None:
        return key(at[a]) / key(at[b]) if a in at and b in at else None

    per_token = lambda r: r["step_s"] / r["n"]  # noqa: E731
    memory_per_token = lambda r: r["working"] / r["n"]  # noqa: E731
    checks = [
        ("ours: time per token at N=1,048,576 over that at 16,384 (target <= 4)", ratio(("sparse", 1048576), ("sparse", 16384), per_token)),
        ("ours: tokens/s over the peer's at N=65,536 (target >= 10)", ratio(("peer", 65536), ("sparse", 65536), per_token)),
        ("ours: tokens/s over our dense pattern's at N=65,536", ratio(("dense", 65536), ("sparse", 65536), per_token)),
        ("ours: working memory per token at N=1,048,576 over that at 16,384 (target <= 1.2)",
         ratio(("sparse", 1048576), ("sparse", 16384), memory_per_token)),
    ]  # fmt: skip
    for label, value in checks:
        out.append(f"- {label}: " + ("not measured in this run" if value is None else f"**{value:.2f}**"))
    if ("sparse", 1048576) in at and ("sparse", 16384) in at:
        flops = {n: step_flops_per_token(n) for n in (16384, 1048576)}
        out.append(
            f"- ours: a step's FLOPs per token at N=1,048,576 over those at 16,384 (the model's count, 4x forward with "
            f"recompute, 3x without): {flops[1048576] / flops[16384]:.2f}; FLOP/s at 1,048,576 over those at 16,384: "
            f"{(flops[1048576] / per_token(at[('sparse', 1048576)])) / (flops[16384] / per_token(at[('sparse', 16384)])):.2f}"
        )
    both = sorted(n for side, n in at if side == "peer" and ("sparse", n) in at)
    if both:
        ratios = ", ".join(f"{at[('sparse', n)]['working'] / at[('peer', n)]['working']:.2f} at {n:,}" for n in both)
        out.append(f"- ours: working memory over the peer's where both ran (target < 1): {ratios}")
    one = at.get(("sparse", 1048576))
    if one:
        out.append(f"- ours at N=1,048,576: whole-process peak {one['peak'] / 2**30:.2f} GiB (target <= 16 GiB)")
    return out


def write_results(args: argparse.Namespace, rows: list[dict], stops: dict[str, str]) -> None:
    from bench import plots
    from bench.machine import device_name, load_average
    from sparse_transformer.files import write_atomic

    sparse = [r for r in rows if r["side"] == "sparse"]
    table = [
        "| side | N | step s | tokens/s | µs per token | working MiB | working KiB per token | whole peak MiB | params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {LABELS[r['side']]} | {r['n']:,} | {r['step_s']:.2f} | {r['n'] / r['step_s']:,.0f} | {1e6 * r['step_s'] / r['n']:.1f} | "
            f"{r['working'] / 2**20:,.0f} | {r['working'] / r['n'] / 1024:.2f} | {r['peak'] / 2**20:,.0f} | {r['params'] / 1e6:.2f}M |"
        )
    slopes = []
    for side in dict.fromkeys(r["side"] for r in rows):
        mine = [r for r in rows if r["side"] == side]
        time_slope = slope([(r["n"], r["step_s"] / r["n"]) for r in mine])
        memory_slope = slope([(r["n"], r["working"] / r["n"]) for r in mine])
        if time_slope is not None:
            slopes.append(
                f"- {LABELS[side]}: time per token ~ N^{time_slope:.2f}, working memory per token ~ N^{memory_slope:.2f}"
            )
    plot = plots.long_sequences(rows, args.out.with_suffix(".png"), f"one training step, batch 1, {device_name('cpu')}")
    lines = [
        "# One training step at the paper's lengths (CPU)",
        "",
        f"`{shlex.join(['python', 'bench/long.py', *sys.argv[1:]])}`",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {device_name('cpu')}; load average {load_average()} at the end "
        "(1, 5, 15 min). The quickstart's size (4 layers, d=192, 6 heads), batch 1, one AdamW step with clipping, on "
        f"random bytes; ours with stride about sqrt(64 N) in blocks of {BLOCK} (stride at each N: "
        + ", ".join(f"{n:,}: {stride(n):,}" for n in sorted({r['n'] for r in sparse}))
        + f"), recompute from N={RECOMPUTE_FROM:,}. Each row is its own process; working memory is the peak less the "
        "size after imports.",
        "",
        *table,
        "",
        *slopes,
        *(f"- {LABELS[side]}: {why}" for side, why in stops.items()),
        "",
        "Against the targets (ratios within this run):",
        "",
        *summary_lines(rows),
        "",
        plot,
        "",
    ]
    write_atomic(args.out, "\n".join(lines).encode())
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
