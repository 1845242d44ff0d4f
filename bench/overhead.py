"""Framework overhead: a training step through train.py against a plain PyTorch loop over the same model, data
and optimizer, and against a plain dense model of the same size, split into where the time goes.

    python bench/overhead.py                                   # the quickstart's model and data
    python bench/overhead.py --config configs/tiny.yaml --steps 40

Three sides, alternating in rounds in one process:

- ``train.py (Lightning)``: the CLI builds the model and the DataModule from the config and trains through
  ``trainer.fit`` with everything a run has (loggers, progress bar, checkpointing, the divergence guard,
  throughput and learning-rate monitors), validation off;
- ``plain loop, ours``: the loop one would write by hand (``bench/loop.py``) over what the CLI built: the
  same batches, the LightningModule's loss, AdamW on the same parameter groups, the warmup-cosine schedule,
  gradient clipping;
- ``plain loop, dense peer``: the same loop over x-transformers' dense decoder of the model's size (flash
  SDPA; ``bench/peers.py``), where the ``peers`` extra is installed.

A step runs from one batch's start to the next's and splits into forward + loss, backward, optimizer
(clipping, step, schedule) and between (data, logging, the callbacks' batch ends). The table gives medians
over the steps after the first few and writes them with the command to bench/results/overhead-<device>.md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import train  # noqa: E402
from bench.loop import SEGMENTS, StepMarks, forever, plain_loop, step_segments  # noqa: E402
from bench.machine import device_name, load_average  # noqa: E402
from bench.peers import build_peer, next_byte_loss  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402

LIGHTNING, PLAIN, PEER = "train.py (Lightning)", "plain loop, ours", "plain loop, dense peer"


def build(args: argparse.Namespace, root: Path):
    options = ["--config", str(args.config), "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0"]
    options += ["--trainer.default_root_dir", str(root), "--samples.every_n_val", "0"]
    return train.main(options, run=False)


def lightning_marks(args: argparse.Namespace, root: Path) -> list[list[float]]:
    cli = build(args, root)
    marks = StepMarks()
    cli.trainer.callbacks.insert(0, marks)  # first: its batch end comes right after the optimizer step
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return marks.marks


def plain_marks(args: argparse.Namespace, root: Path) -> list[list[float]]:
    """The loop by hand, over what the CLI built: no Trainer."""
    cli = build(args, root)
    module, data = cli.model, cli.datamodule
    data.setup("fit")
    optimizer, schedule = module.optimizer_and_schedule(args.steps)
    module.train()
    return plain_loop(module._loss, list(module.parameters()), optimizer, schedule, forever(data.train_dataloader), args.steps)


def peer_marks(args: argparse.Namespace, root: Path) -> list[list[float]]:
    """The same loop and batches over a dense decoder of the same size from x-transformers."""
    cli = build(args, root)
    module, data = cli.model, cli.datamodule
    config = module.model.config
    torch.manual_seed(0)
    peer = build_peer(config.seq_len, config.d_model, config.n_layers, config.n_heads, config.ffn_mult)
    hp = module.hparams
    from sparse_transformer.training.lightning_module import adamw_with_schedule

    optimizer, schedule = adamw_with_schedule(
        peer.parameters(), hp.lr, hp.betas, hp.weight_decay, hp.warmup_steps, hp.min_lr_ratio, args.steps
    )
    data.setup("fit")
    peer.train()
    return plain_loop(
        lambda b: next_byte_loss(peer, b),
        list(peer.parameters()),
        optimizer,
        schedule,
        forever(data.train_dataloader),
        args.steps,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    p.add_argument("--steps", type=int, default=60, help="training steps per round and side")
    p.add_argument("--skip", type=int, default=5, help="first steps of each round left out (allocation, caches)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running every side")
    p.add_argument("--sides", nargs="+", choices=["plain", "lightning", "peer"], default=["plain", "lightning", "peer"])
    p.add_argument("--out", type=Path, help="default: bench/results/overhead-<device>.md")
    args = p.parse_args()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = load_average()
    sides = {
        name: run
        for key, name, run in (("plain", PLAIN, plain_marks), ("lightning", LIGHTNING, lightning_marks))
        if key in args.sides
    }
    try:
        import x_transformers  # noqa: F401

        if "peer" in args.sides:
            sides[PEER] = peer_marks
    except ImportError:
        print("no dense peer: x-transformers is not installed (pip install -e '.[peers]')")
    steps: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in order:
                mine = step_segments(sides[name](args, Path(tmp) / f"{len(name)}-{r}"))[args.skip :]
                steps[name] += mine
                print(f"round {r}: {name}: median {1e3 * statistics.median(s['total'] for s in mine):.1f} ms/step", flush=True)
    med = {name: {k: 1e3 * statistics.median(s[k] for s in steps[name]) for k in (*SEGMENTS, "total")} for name in steps}
    plain = med[PLAIN]["total"] if PLAIN in med else float("nan")
    peer = med.get(PEER, {}).get("total")
    lines = [
        f"# Framework overhead on {device_name('cpu')}",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date: {started}; torch {torch.__version__}, lightning {L.__version__}; float32; load before the runs: {load}",
        f"- config: `{args.config}`; {args.rounds} rounds of {args.steps} steps per side, the first {args.skip} of each left out",
        "",
        "| side | " + " | ".join(f"{k} ms" for k in SEGMENTS) + " | step ms | steps timed | x plain | x peer |",
        "|---|" + "---:|" * (len(SEGMENTS) + 4),
    ]
    for name, m in med.items():
        vs_peer = f"{m['total'] / peer:.3f}" if peer else "-"
        cells = " | ".join(f"{m[k]:.1f}" for k in SEGMENTS)
        lines.append(f"| {name} | {cells} | {m['total']:.1f} | {len(steps[name])} | {m['total'] / plain:.3f} | {vs_peer} |")
    lines += [
        "",
        "Medians per segment and of the whole step (the segments' medians need not add up to the step's). A step: "
        "from one batch's start to the next's. forward + loss: to the loss; backward: zero_grad and backward; "
        "optimizer: clipping, AdamW, the schedule; between: data loading, logging, the callbacks' batch ends and "
        "batch starts. The Lightning side runs every callback and logger a run has, with validation and sampling "
        "off; the plain sides are the same DataLoader, loss, AdamW parameter groups, schedule and clipping by hand; "
        "the peer is x-transformers' dense decoder of the same size (flash SDPA, causal).",
    ]
    text = "\n".join(lines) + "\n"
    out = args.out or Path(__file__).resolve().parent / "results" / "overhead-cpu.md"
    write_atomic(out, text)
    print(f"\n{text}\nwritten to {out}")


if __name__ == "__main__":
    main()
