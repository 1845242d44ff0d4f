"""What the samples drawn at validation cost a run: SampleLogger's sampling against the training it interrupts.

    python bench/validation_samples.py                          # the quickstart, SampleLogger's default and others
    python bench/validation_samples.py --config configs/cifar10-tiny.yaml --settings 2x64 --steps 4

Builds the config's model and data through train.py's CLI (nothing is trained to a result), then times, in
rounds that alternate so a drift in the machine's speed falls on every row alike: a training step (forward,
backward, AdamW) on the config's batches, and one sampling pass of each setting (``<count>x<length>``, the
an image's always a whole image; ``default`` is SampleLogger's own, as the config sets it). A run's share is
``validations * sample_s / (max_steps * step_s + validations * sample_s)``, with the config's steps and
validations (validation itself left out: it costs the same whatever the samples). The table, with the command,
goes to bench/results/validation-samples-<device>.md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import train  # noqa: E402
from bench.machine import cpu_name  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.sampling import sample  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--settings", nargs="+", default=["default", "4x256", "2x256", "2x128", "1x256"],
                   help="samples per validation as <count>x<length>, or default (SampleLogger's)")  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="training steps timed per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # ours are not train.py's
    cli = train.main(["--config", args.config, "--trainer.logger", "false"], run=False)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    logger = next(c for c in trainer.callbacks if type(c).__name__ == "SampleLogger")
    data.setup("fit")
    loader = data.train_dataloader()
    batches = iter(loader)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    seq_len = module.model.seq_len
    settings = {}
    for name in args.settings:
        count, length = (logger.num_samples, logger.sample_length(module)) if name == "default" else map(int, name.split("x"))
        settings[name] = (count, length if "length" in module.modality.options else seq_len)

    def step() -> None:
        nonlocal batches
        module.train()
        batch = next(batches, None)
        if batch is None:  # a short epoch: start the next
            batches = iter(loader)
            batch = next(batches)
        loss = module._loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, layouts
    step_times, sample_times = [], {name: [] for name in settings}
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        step_times.append((time.perf_counter() - started) / args.steps)
        for name, (count, length) in settings.items():
            started = time.perf_counter()
            sample(module.model, module.modality, count, length, logger.sampling)
            sample_times[name].append(time.perf_counter() - started)
            module.train()

    max_steps = trainer.max_steps
    interval = trainer.val_check_interval
    validations = max_steps // interval if isinstance(interval, int) and interval > 0 else 1
    validations //= max(logger.every_n_val, 1)
    step_s = statistics.median(step_times)
    rows = []
    for name, (count, length) in settings.items():
        sample_s = statistics.median(sample_times[name])
        share = validations * sample_s / (max_steps * step_s + validations * sample_s)
        rows.append(f"| {name} | {count} | {length} | {sample_s:.2f} | {count * length / sample_s:,.0f} | {share:.1%} |")
    command = shlex.join(["python", "bench/validation_samples.py", *(argv if argv is not None else sys.argv[1:])])
    threads = torch.get_num_threads()
    table = "\n".join([
        f"# Samples at validation against training: {Path(args.config).name} on {cpu_name()}, {threads} threads",
        "",
        f"`{command}` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC). A training step: {step_s * 1000:.0f} ms "
        f"(median of {args.rounds} rounds of {args.steps}); the run: {max_steps} steps, samples at {validations} "
        f"validations (every_n_val={logger.every_n_val}). Times are medians over the same rounds.",
        "",
        "| setting | samples | tokens each | s per validation | tokens/s | share of the run |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])  # fmt: skip
    print(table)
    device = "cuda" if next(module.parameters()).is_cuda else "cpu"
    out = args.out or Path(f"bench/results/validation-samples-{device}.md")
    write_atomic(out, table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
