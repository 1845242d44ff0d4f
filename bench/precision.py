"""A training step in fp32 against bf16 autocast (``--trainer.precision bf16-mixed``) on the CPU, per config.

    python bench/precision.py                               # the quickstart, and a d=512 N=2048 strided model
    python bench/precision.py --cases quickstart --rounds 3 --steps 10

bf16 autocast runs the linear layers' matrix products in bf16 (oneDNN), twice the fp32 rate on a CPU with bf16
units (avx512_bf16, amx_bf16) and emulated, slower, without them; the attention backends compute in fp32 whatever
their input. So it pays where the linear layers dominate a step: wide models. Each case is built by train.py's
LightningCLI from a config and overrides; the step is bench/loop.py's plain loop (the module's loss, AdamW,
clipping), under ``torch.autocast("cpu", dtype=torch.bfloat16)`` for bf16-mixed, which is what Lightning's
bf16-mixed plugin does. Precisions alternate in rounds on one model per case, so a drift in the machine's speed
falls on both; the table (median ms per step, tokens/s, the speed-up) goes to bench/results/precision-cpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import train  # noqa: E402
from bench.loop import forever, plain_loop  # noqa: E402
from bench.machine import device_name  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402

CASES = {
    "quickstart": ["--config", "configs/quickstart.yaml"],  # d=192, 4 layers, N=256, batch 16
    "d512-n2048": [  # the quickstart's model widened to d=512 (8 heads of 64) at N=2048, batch 2
        "--config", "configs/quickstart.yaml", "--model.network.d_model", "512", "--model.network.n_heads", "8",
        "--data.init_args.seq_len", "2048", "--data.init_args.batch_size", "2",
    ],
}  # fmt: skip
PRECISIONS = ("32-true", "bf16-mixed")


def build(case: str, root: Path):
    options = [*CASES[case], "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root), "--samples.every_n_val", "0"]
    return train.main(options, run=False)


def timed_steps(cli, precision: str, steps: int) -> list[float]:
    """Seconds per training step, ``steps`` of them, of ``bench/loop.py``'s plain loop in ``precision`` (data
    loading excluded: a step's time runs from its batch in hand to the schedule's step)."""
    module, data = cli.model, cli.datamodule
    optimizer, schedule = module.optimizer_and_schedule(10_000)
    module.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()

    def loss(batch: torch.Tensor) -> torch.Tensor:
        with autocast:
            return module._loss(batch)

    marks = plain_loop(loss, list(module.parameters()), optimizer, schedule, forever(data.train_dataloader), steps)
    return [step[-1] - step[0] for step in marks[:-1]]  # the last marks only close the final step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--steps", type=int, default=8, help="timed steps per round and precision")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each round's timed ones")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "precision-cpu.md")
    args = p.parse_args()
    started, load = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            cli = build(case, Path(tmp) / case)
            data = cli.datamodule
            data.setup("fit")
            tokens = data.batch_size * data.seq_len
            times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
            for r in range(args.rounds):
                for precision in PRECISIONS:
                    steps = timed_steps(cli, precision, args.warmup + args.steps)[args.warmup :]
                    times[precision] += steps
                    print(f"{case} round {r} {precision}: median {1e3 * statistics.median(steps):.0f} ms/step", flush=True)
            fp32, bf16 = (statistics.median(times[p]) for p in PRECISIONS)
            net = cli.model.hparams["network"]
            shape = f"d={_get(net, 'd_model')}, {_get(net, 'n_layers')} layers, {_get(net, 'n_heads')} heads, N={data.seq_len}, batch {data.batch_size}"
            rows.append(f"| {case} | {shape} | {1e3 * fp32:.0f} | {1e3 * bf16:.0f} | {tokens / fp32:,.0f} | {tokens / bf16:,.0f} | {fp32 / bf16:.2f}x |")
    lines = [
        f"# A training step in fp32 and in bf16-mixed on {device_name(torch.device('cpu'))}",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date: {started}; torch {torch.__version__}; load average at the start {load[0]:.2f}"
        + (" (a shared machine: other work ran beside these runs)" if load[0] > 0.5 else ""),
        f"- {args.rounds} rounds per case, each precision in turn; {args.steps} steps timed per round after {args.warmup}",
        "- cases: " + "; ".join(f"{case}: `{' '.join(CASES[case])}`" for case in args.cases),
        "",
        "| case | model | fp32 ms/step | bf16-mixed ms/step | fp32 tokens/s | bf16-mixed tokens/s | bf16 speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "A step: forward, backward, gradient clipping and AdamW, data loading excluded. bf16-mixed: the loss under "
        "torch.autocast('cpu', dtype=torch.bfloat16), as Lightning's plugin runs it; parameters and optimizer in fp32.",
    ]
    text = "\n".join(lines) + "\n"
    write_atomic(args.out, text)
    print(f"\n{text}\nwritten to {args.out}")


def _get(config, name: str):
    return config[name] if isinstance(config, dict) else getattr(config, name)


if __name__ == "__main__":
    main()
