"""Memory per process of sharded training (FSDP2, ``configs/strategies/fsdp2.yaml``) on 1 process and on several.

    python bench/sharded.py                                   # d_model 1024, 8 layers (101M parameters), 1 and 2 ranks
    python bench/sharded.py --d-model 256 --layers 2 --ranks 1 2 --steps 2   # a quick check

Each rank count trains the same model through the real command line (``train.py fit`` on ``configs/tiny.yaml``
with the overlay, its model made wider and deeper, batches of one short window), so parameters, gradients and
AdamW's two moments (16 bytes per parameter, of which each rank holds ``1 / ranks``) outweigh activations. A
callback in every rank reads the process's resident memory (Linux: VmRSS, and VmHWM, the peak, reset through
/proc/self/clear_refs when training starts): at the start of training, its peak in training, and its peak
including the final save, which gathers the full weights and optimizer state on rank 0 to write one file
(``training/fsdp2.py``). glibc is told to map every allocation above 128 KiB fresh and unmap it when freed
(``MALLOC_MMAP_THRESHOLD_``), so memory freed after the model was sharded is not counted as held. The table is
written with the command to ``bench/results/sharded-cpu.md``; nothing is timed. The first ``--ranks`` is the
baseline of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.machine import cpu_name  # noqa: E402
from bench.rss import current_rss, peak_rss, reset_peak  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sharded-cpu.md")
    return p.parse_args()


class ResidentMemory(L.Callback):
    """Writes ``{"rank", "start", "training", "with_save"}`` (MiB) to ``<folder>/rank<r>.json``."""

    def __init__(self, folder: str):
        self.folder, self.record = Path(folder), {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reset_peak()  # the peak from here on
        self.record = {"rank": trainer.global_rank, "start": current_rss() / 2**20}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["training"] = peak_rss() / 2**20  # before the final save: checkpoint callbacks run after all others

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.record["with_save"] = peak_rss() / 2**20
        (self.folder / f"rank{self.record['rank']}.json").write_text(json.dumps(self.record))


def measure(args: argparse.Namespace, ranks: int) -> list[dict]:
    """Train on ``ranks`` processes; each one's memory, by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--config", "configs/strategies/fsdp2.yaml",
            "--model.network.d_model", str(args.d_model), "--model.network.n_layers", str(args.layers),
            "--model.network.n_heads", str(max(args.d_model // 64, 1)), "--data.batch_size", "1",
            "--trainer.devices", str(ranks), "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--samples.every_n_val", "0", "--trainer.default_root_dir", f"{tmp}/run",
            "--trainer.callbacks+=bench.sharded.ResidentMemory", f"--trainer.callbacks.folder={tmp}",
        ]  # fmt: skip
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"train.py on {ranks} ranks failed:\n{result.stderr[-3000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    args = parse_args()
    per_parameter = 16  # fp32 weight, gradient and AdamW's two moments
    parameters = 12 * args.layers * args.d_model**2 + 2 * 256 * args.d_model  # blocks, embedding and head (about)
    rows, baseline = [], None
    for ranks in args.ranks:
        for record in measure(args, ranks):
            growth = record["training"] - record["start"]  # gradients, AdamW state, activations, a gathered block
            baseline = baseline or (record["training"], growth)
            rows.append(
                f"| {ranks} | {record['rank']} | {record['start']:,.0f} | {record['training']:,.0f} | "
                f"{record['training'] / baseline[0]:.2f} | {growth:,.0f} | {growth / baseline[1]:.2f} | "
                f"{record['with_save']:,.0f} | {parameters * per_parameter / 2**20 / ranks:,.0f} |"
            )
    command = shlex.join(["python", "bench/sharded.py", *sys.argv[1:]])
    text = "\n".join([
        f"# Sharded training (FSDP2): resident memory per process, {datetime.now(UTC):%Y-%m-%d}",
        "",
        f"`{command}` on {cpu_name()}: d_model {args.d_model}, {args.layers} layers (about {parameters / 1e6:.1f}M "
        f"parameters), batches of 1 window of 64 bytes, {args.steps} steps, one thread per process.",
        "",
        "| ranks | rank | MiB at training start | peak MiB in training | vs the first row | growth in training (MiB) | "
        "vs the first row | peak MiB with the final save | weights, gradients and AdamW state per rank (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Resident memory includes the interpreter, torch, Lightning and the attention kernels (about 1 GiB in every "
        "process). The growth in training is the peak less the memory at its start, where the sharded weights are "
        "already resident: gradients and AdamW's moments (12 bytes per parameter, divided among the ranks), "
        "activations and one block's gathered weights. The final save gathers the full weights and optimizer state "
        "on rank 0.",
        "",
    ])  # fmt: skip
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
