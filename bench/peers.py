"""Our model against a widely used dense decoder from PyPI: same size, bytes, steps, batch, optimizer and schedule.

    pip install -e '.[peers,bench]'
    python bench/peers.py                                   # N=256 (batch 16), 2048 (batch 2), 8192 (batch 1)
    python bench/peers.py --cases 2048:2 --steps 100 --rounds 2

The peer is x-transformers' ``TransformerWrapper`` around a ``Decoder`` with ``attn_flash=True`` (PyTorch's
fused causal SDPA), learned absolute positions, pre-norm, GELU feed-forward: 4 layers, d=192, 6 heads of 32,
feed-forward 4x, as ours (1.92M parameters against our 1.93M). It trains in the loop one writes by hand
(``bench/loop.py``). Ours trains the way a user trains it: through ``train.py``'s LightningCLI with every
callback and logger a run has (checkpoints included), validation and samples off during training as the
peer has none. Both get the same windows in the same order (our DataModule, one epoch of exactly the
budget), AdamW with decay on matrices only, the same warmup-cosine schedule, clipping at 1.0, lr 2e-3 and
the seed. Ours uses the sparse pattern of :data:`SPARSE` at each N (``--dense`` adds our dense pattern).

Every run is its own process, so memory peaks are per run, and the runs of one N alternate (peer, ours,
then ours, peer in the next round). Figures per run:

- training tokens/s: tokens of the steps after the first ``--skip`` over their time, from one batch's
  start to the next's (data, hooks, logging and checkpoints included);
- peak resident memory: the process's high-water mark, whole, and above its size once the libraries were
  imported (what the model, the optimizer, activations, the data and the framework's running state
  cost). Both processes import torch, Lightning (our DataModule gives the peer its bytes) and their model's
  package; ours also imports TensorBoard and the loggers when the run starts, which the second figure counts;
- held-out bits/byte: every validation window of the corpus, the final weights, the same code for both.

Written with the command, the CPU and its instruction sets to bench/results/peers-cpu.md, with a plot.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import train  # noqa: E402
from bench import plots  # noqa: E402
from bench.machine import device_name, load_average  # noqa: E402
from bench.loop import SEGMENTS, current_rss, forever, held_out_bits, medians, peak_rss, plain_loop, step_segments  # noqa: E402
from sparse_transformer.data import ByteTextDataModule  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.training.lightning_module import adamw_with_schedule  # noqa: E402

CONFIG = ROOT / "configs" / "quickstart.yaml"  # 4 layers, d=192, 6 heads, lr 2e-3, warmup 50
SEED = 1337  # the quickstart's seed_everything
LR, BETAS, WEIGHT_DECAY, WARMUP, MIN_LR_RATIO = 2e-3, (0.9, 0.95), 0.01, 50, 0.1  # what the quickstart trains with
SIZE = {"d_model": 192, "n_layers": 4, "n_heads": 6, "ffn_mult": 4}

# Our pattern at each N. Block size and stride set the density (the share of causal tiles computed):
# - 256: the quickstart's own (strided, stride 64 in blocks of 32, heads split). At N=256 attention is a tenth
#   of the step; the layout saves little and costs a few more kernel calls.
# - 2048, 8192: fixed with heads split (half the heads read their own chunk of `stride`, half the last block
#   of every chunk, the paper's enwik8 pattern), stride ~ sqrt(N * block) so both halves are about equally
#   sparse: density 0.16 at 2048 (stride 256, blocks of 32) and 0.11 at 8192 (stride 704 = 11 blocks of 64).
SPARSE: dict[int, dict[str, Any]] = {
    256: {"kind": "strided", "block_size": 32, "stride": 64, "heads": "split"},
    2048: {"kind": "fixed", "block_size": 32, "stride": 256, "summary": 32, "heads": "split"},
    8192: {"kind": "fixed", "block_size": 64, "stride": 704, "summary": 64, "heads": "split"},
}


def sparse_settings(n: int) -> dict[str, Any]:
    """The pattern for context ``n``: :data:`SPARSE`'s, or the nearest N's scaled to fit (tiny test shapes)."""
    if n in SPARSE:
        return SPARSE[n]
    block = 16 if n < 256 else 32
    return {"kind": "strided", "block_size": block, "stride": 2 * block, "heads": "split"}


def build_peer(seq_len: int, d_model: int, n_layers: int, n_heads: int, ffn_mult: float) -> torch.nn.Module:
    """x-transformers' dense decoder of our size: heads of d_model / n_heads (its default is 64)."""
    from x_transformers import Decoder, TransformerWrapper

    layers = Decoder(
        dim=d_model, depth=n_layers, heads=n_heads, attn_dim_head=d_model // n_heads, ff_mult=ffn_mult, attn_flash=True
    )
    return TransformerWrapper(num_tokens=256, max_seq_len=seq_len, attn_layers=layers)


def next_byte_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])  # (B, N, 256)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def data(n: int, batch: int, steps: int) -> ByteTextDataModule:
    """The shipped corpus, one epoch of exactly ``steps`` batches, so both sides see the same windows in order."""
    return ByteTextDataModule(seq_len=n, batch_size=batch, samples_per_epoch=steps * batch)


def ours_options(args: argparse.Namespace, root: Path) -> list[str]:
    pattern = (
        {"kind": "dense", "block_size": sparse_settings(args.seq_len)["block_size"]}
        if args.side == "dense"
        else sparse_settings(args.seq_len)
    )
    options = ["--config", str(CONFIG), "--seed_everything", str(SEED), "--trainer.default_root_dir", str(root)]
    options += ["--data.init_args.seq_len", str(args.seq_len), "--data.init_args.batch_size", str(args.batch)]
    options += ["--data.init_args.samples_per_epoch", str(args.steps * args.batch), "--trainer.max_steps", str(args.steps)]
    options += ["--trainer.limit_val_batches", "0", "--samples.every_n_val", "0", "--trainer.enable_progress_bar", "false"]
    options += [f"--model.network.pattern.{key}={value}" for key, value in pattern.items()]
    options += [f"--model.network.{key}={value}" for key, value in SIZE.items()]
    options += [f"--model.{key}={value}" for key, value in (("lr", LR), ("warmup_steps", WARMUP), ("min_lr_ratio", MIN_LR_RATIO))]
    return options


def run_ours(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Through train.py's CLI, as ``train.py fit`` runs it."""
    from bench.loop import StepMarks

    base = current_rss()
    cli = train.main(ours_options(args, root), run=False)
    marks = StepMarks()
    cli.trainer.callbacks.insert(0, marks)  # first, so its batch end comes right after the optimizer step
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    peak = peak_rss()
    model = cli.model.model.eval()
    bits = held_out_bits(model, cli.datamodule.val_dataloader(), limit=0)
    return {"marks": marks.marks, "base": base, "peak": peak, "bits": bits, "params": model.num_params()}


def run_peer(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The peer in the plain loop, on our DataModule's batches."""
    import x_transformers  # noqa: F401  (imported before the baseline, as ours imports its package)

    base = current_rss()
    torch.manual_seed(SEED)
    model = build_peer(args.seq_len, **SIZE)
    dm = data(args.seq_len, args.batch, args.steps)
    dm.setup("fit")
    optimizer, schedule = adamw_with_schedule(model.parameters(), LR, BETAS, WEIGHT_DECAY, WARMUP, MIN_LR_RATIO, args.steps)
    model.train()
    marks = plain_loop(
        lambda b: next_byte_loss(model, b),
        list(model.parameters()),
        optimizer,
        schedule,
        forever(dm.train_dataloader),
        args.steps,
    )
    peak = peak_rss()
    bits = held_out_bits(model.eval(), dm.val_dataloader(), limit=0)
    return {"marks": marks, "base": base, "peak": peak, "bits": bits, "params": sum(p.numel() for p in model.parameters())}


def child(args: argparse.Namespace) -> None:
    """One run in this process; its row as JSON to ``--result``."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = run_peer(args, Path(tmp)) if args.side == "peer" else run_ours(args, Path(tmp))
    steps = step_segments(run.pop("marks"))[args.skip :]
    tokens = args.batch * args.seq_len
    seconds = sum(s["total"] for s in steps)
    row = {
        "side": args.side,
        "n": args.seq_len,
        "batch": args.batch,
        "steps": args.steps,
        "timed_steps": len(steps),
        "tokens_per_s": tokens * len(steps) / seconds,
        "step_ms": {k: 1e3 * v for k, v in medians(steps).items()},
        "base_mib": run["base"] / 2**20,
        "peak_mib": run["peak"] / 2**20,
        "growth_mib": (run["peak"] - run["base"]) / 2**20,
        "bits": run["bits"],
        "params": run["params"],
        "wall_s": time.perf_counter() - started,
    }
    write_atomic(args.result, json.dumps(row))


def run_in_subprocess(side: str, n: int, batch: int, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--child", side, "--seq-len", str(n), "--batch", str(batch)]
        command += ["--steps", str(steps), "--skip", str(args.skip), "--result", str(result)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{side} at N={n} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(result.read_text())


def pattern_text(n: int, side: str) -> str:
    if side == "peer":
        return "dense (x-transformers, flash SDPA)"
    if side == "dense":
        return "dense pattern"
    s = sparse_settings(n)
    extra = f", summary {s['summary']}" if "summary" in s else ""
    return f"{s['kind']} ({s['heads']} heads), stride {s['stride']}, block {s['block_size']}{extra}"


def density(n: int) -> float:
    """Share of the causal tiles (whole diagonal tiles counted) that :data:`SPARSE`'s pattern computes at ``n``."""
    from sparse_transformer.model.patterns import AttentionPattern

    return AttentionPattern(**sparse_settings(n)).layout(SIZE["n_heads"], n, 0).density()


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, started: str, load: str) -> str:
    lines = [
        f"# Against a dense peer on {device_name('cpu')}",
        "",
        f"- command: `{command}`",
        f"- date: {started}; torch {torch.__version__}, lightning {L.__version__}, x-transformers {version('x-transformers')}; "
        f"float32; load before the runs: {load}",
        f"- both: 4 layers, d=192, 6 heads of 32, feed-forward 768; the shipped corpus; the steps of the table, the first "
        f"{args.skip} not timed; AdamW lr {LR:g}, betas {BETAS}, weight decay {WEIGHT_DECAY} on matrices, "
        f"{WARMUP} warmup steps then cosine to {MIN_LR_RATIO:g}x, clipping at 1.0; seed {SEED}; {args.rounds} round(s), "
        "each run its own process, the order alternating",
        "- ours: `train.py fit --config configs/quickstart.yaml` with the options above (every callback and logger, "
        "checkpoints; validation and samples off while training); the peer: x-transformers `TransformerWrapper(Decoder("
        "attn_flash=True))` in a plain loop",
        "",
        "| N | batch | steps | model | pattern | tokens/s | x peer | step ms (fwd / bwd / opt / between) | peak RSS MiB | x peer "
        "| RSS above imports MiB | x peer | held-out bits/byte | vs peer |",
        "|---:|---:|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for (n, batch), group in _groups(rows).items():
        peer = _mean(group["peer"])
        for side, runs in group.items():
            r = _mean(runs)
            summary.setdefault(side, {})[n] = r
            ms = r["step_ms"]
            lines.append(
                f"| {n} | {batch} | {r['steps']} | {'peer' if side == 'peer' else 'ours'} | {pattern_text(n, side)} | {r['tokens_per_s']:,.0f} | "
                f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f} | {ms['total']:.0f} ({' / '.join(f'{ms[k]:.0f}' for k in SEGMENTS)}) | "
                f"{r['peak_mib']:.0f} | {r['peak_mib'] / peer['peak_mib']:.2f} | {r['growth_mib']:.0f} | "
                f"{r['growth_mib'] / peer['growth_mib']:.2f} | {r['bits']:.3f} | {r['bits'] - peer['bits']:+.3f} |"
            )
    lines += [
        "",
        "tokens/s: training tokens of the timed steps over their time, from one batch's start to the next's (data, "
        "hooks, logging and checkpoint writes included); the mean over rounds. step ms: the median step and its "
        "segments (forward + loss, backward, optimizer with clipping, and between: data, logging, hooks; "
        "`bench/loop.py`). peak RSS: the process's resident high-water mark; RSS above imports: the same above its "
        "size once torch, Lightning and the model's package were imported, before the model was built. held-out "
        "bits/byte: every validation window of the corpus (its 5% before the test split), final weights, one code path for both.",
        "",
        "Sparse densities (share of causal tiles computed): "
        + ", ".join(f"N={n}: {density(n):.3f}" for n in sorted({r["n"] for r in rows})),
    ]
    path = (args.out or ROOT / "bench" / "results" / "peers-cpu.md").with_suffix(".png")
    lines += ["", plots.peers(summary, path, f"ours vs x-transformers (dense, flash SDPA), {device_name('cpu')}")]
    return "\n".join(lines) + "\n"


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, list[dict[str, Any]]]]:
    groups: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault((r["n"], r["batch"]), {}).setdefault(r["side"], []).append(r)
    return groups


def _mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one side averaged: tokens/s, memory and step times; bits are the same every round."""
    out = dict(runs[0])
    for key in ("tokens_per_s", "peak_mib", "growth_mib", "bits"):
        out[key] = sum(r[key] for r in runs) / len(runs)
    out["step_ms"] = {k: sum(r["step_ms"][k] for r in runs) / len(runs) for k in runs[0]["step_ms"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["256:16", "2048:2", "8192:1"], help="N:batch or N:batch:steps")
    p.add_argument("--steps", type=int, default=200, help="training steps per run where a case does not say")
    p.add_argument("--skip", type=int, default=5, help="first steps of a run not timed (allocation, caches)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each side per N, alternating which goes first")
    p.add_argument("--dense", action="store_true", help="also train ours with the dense pattern")
    p.add_argument("--out", type=Path, help="default: bench/results/peers-cpu.md")
    p.add_argument("--child", choices=["ours", "dense", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.side = args.child
        return child(args)
    try:
        import x_transformers  # noqa: F401
    except ImportError:
        sys.exit("error: bench/peers.py needs x-transformers: pip install -e '.[peers]'")
    cases = []
    for case in args.cases:
        fields = case.split(":")
        if len(fields) not in (2, 3) or not all(f.isdigit() and int(f) > 0 for f in fields):
            sys.exit(f"error: --cases {case!r} must be N:batch or N:batch:steps, e.g. 2048:2 or 8192:1:60")
        n, batch, steps = (*map(int, fields), args.steps)[:3]
        if steps <= args.skip + 1:
            sys.exit(f"error: {steps} steps at N={n} must exceed --skip {args.skip} + 1")
        cases.append((n, batch, steps))
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = load_average()
    sides = ["peer", "ours", *(["dense"] if args.dense else [])]
    rows = []
    for n, batch, steps in cases:
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                row = run_in_subprocess(side, n, batch, steps, args)
                rows.append(row)
                print(
                    f"N={n} batch={batch} round {r}: {side}: {row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_mib']:.0f} MiB "
                    f"({row['growth_mib']:.0f} above imports), {row['bits']:.3f} bits/byte, {row['wall_s']:.0f} s",
                    flush=True,
                )
        text = report(rows, args, shlex.join(["python", "bench/peers.py", *sys.argv[1:]]), started, load)
        out = args.out or ROOT / "bench" / "results" / "peers-cpu.md"
        write_atomic(out, text)  # after every N, so a long run's finished contexts are kept
    print(f"\n{text}\nwritten to {out}")


if __name__ == "__main__":
    main()
