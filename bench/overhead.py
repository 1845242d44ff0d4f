"""Framework overhead: a training step through train.py against a plain PyTorch loop over the same model, data
and optimizer, measured in one run.

    python bench/overhead.py                                   # the quickstart's model and data
    python bench/overhead.py --config configs/tiny.yaml --steps 40

Both sides start from the same config: ``train.py``'s LightningCLI builds the model and the DataModule, once
for each side. The Lightning side trains through ``trainer.fit`` with everything a run has (loggers, progress
bar, checkpointing, the divergence guard, throughput and learning-rate monitors), validation off; the plain
side is the loop one would write by hand: the same batches from the same DataLoader, the LightningModule's
loss, AdamW on the same parameter groups, the warmup-cosine schedule and gradient clipping. A step's time is
from the start of one batch to the start of the next (data loading, callbacks and logging included); the
table gives the median over the steps after the first few, from rounds that alternate the two sides, and
writes it with the command to bench/results/overhead-<device>.md.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import train  # noqa: E402
from bench.attention import device_name  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402


class StepTimer(L.Callback):
    """Seconds from one training batch's start to the next's: everything a step costs."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, module) -> None:
        self.starts.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def build(args: argparse.Namespace, root: Path):
    options = ["--config", str(args.config), "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0"]
    options += ["--trainer.default_root_dir", str(root), "--samples.every_n_val", "0"]
    return train.main(options, run=False)


def lightning_steps(args: argparse.Namespace, root: Path) -> list[float]:
    cli = build(args, root)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.steps()


def plain_steps(args: argparse.Namespace, root: Path) -> list[float]:
    """The loop by hand, over what the CLI built: no Trainer."""
    cli = build(args, root)
    module, data = cli.model, cli.datamodule
    data.setup("fit")
    optimizer, schedule = module.optimizer_and_schedule(args.steps)
    module.train()
    starts = []
    epochs = (batch for _ in itertools.count() for batch in data.train_dataloader())  # as Lightning does, past an epoch
    for step, batch in enumerate(epochs):
        starts.append(time.perf_counter())
        if step == args.steps:
            break
        loss = module._loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return [b - a for a, b in zip(starts, starts[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    p.add_argument("--steps", type=int, default=60, help="training steps per round and side")
    p.add_argument("--skip", type=int, default=5, help="first steps of each round left out (allocation, caches)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running both sides")
    p.add_argument("--out", type=Path, help="default: bench/results/overhead-<device>.md")
    args = p.parse_args()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    times: dict[str, list[float]] = {"plain PyTorch loop": [], "train.py (Lightning)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, run in (("plain PyTorch loop", plain_steps), ("train.py (Lightning)", lightning_steps)):
                steps = run(args, Path(tmp) / f"{name[:5]}-{r}")
                times[name] += steps[args.skip :]
                print(f"round {r}: {name}: median {1e3 * statistics.median(steps[args.skip:]):.1f} ms/step", flush=True)
    plain, lightning = (statistics.median(t) for t in times.values())
    lines = [
        f"# Framework overhead on {device_name(torch.device('cpu'))}",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date: {started}; torch {torch.__version__}, lightning {L.__version__}",
        f"- config: `{args.config}`; {args.rounds} rounds of {args.steps} steps per side, the first {args.skip} of each left out",
        "",
        "| side | median ms / step | steps timed | x plain |",
        "|---|---:|---:|---:|",
        f"| plain PyTorch loop | {1e3 * plain:.1f} | {len(times['plain PyTorch loop'])} | 1.00 |",
        f"| train.py (Lightning) | {1e3 * lightning:.1f} | {len(times['train.py (Lightning)'])} | {lightning / plain:.3f} |",
        "",
        "A step: from one batch's start to the next's, data loading included. The Lightning side runs every callback "
        "and logger a run has, with validation and sampling off; the plain side is the same model, DataLoader, "
        "loss, AdamW parameter groups, schedule and gradient clipping by hand.",
    ]
    text = "\n".join(lines) + "\n"
    out = args.out or Path(__file__).resolve().parent / "results" / "overhead-cpu.md"
    write_atomic(out, text)
    print(f"\n{text}\nwritten to {out}")


if __name__ == "__main__":
    main()
