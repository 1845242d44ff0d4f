"""Our model against a widely used dense decoder from PyPI: same size, bytes, steps, batch, optimizer and schedule.

    pip install -e '.[peers,bench]'
    python bench/peers.py                                   # N=256 (batch 16), 2048 (batch 2), 8192 (batch 1), 3 rounds
    python bench/peers.py --cases 2048:2 --steps 100 --rounds 2

The peer is x-transformers' ``TransformerWrapper`` around a ``Decoder`` with ``attn_flash=True`` (PyTorch's
fused causal SDPA), learned absolute positions, pre-norm, GELU feed-forward: 4 layers, d=192, 6 heads of 32,
feed-forward 4x, as ours (1.92M parameters against our 1.93M). It trains in the loop one writes by hand
(``bench/loop.py``). Ours trains the way a user trains it: through ``train.py``'s LightningCLI with every
callback and logger a run has (checkpoints included), validation and samples off during training as the
peer has none. Both get the same windows in the same order (our DataModule, one epoch of exactly the
budget), AdamW with decay on matrices only, the same warmup-cosine schedule, clipping at 1.0, lr 2e-3 and
the seed. Ours uses the sparse pattern of :data:`SPARSE` at each N (``--dense`` adds our dense pattern).

A third process trains the peer as a user's plain script does (``bench/plain_peer.py``: it imports torch and
x-transformers only), for the memory a user of the peer sees; the peer above shares our harness's imports.

Every run is its own process, so memory peaks are per run. Each N runs ``--rounds`` rounds, the order of the
sides reversed every round (peer, ours, plain script in round 0; the other way round in round 1, ...), so
neither side always runs first, on a machine warmer or busier than the other's; the record gives the median
over rounds and the spread (min to max), and lists every run in order with the load average before it.
Figures per run:

- training tokens/s: tokens of the steps after the first ``--skip`` over their time, from one batch's
  start to the next's (data, hooks, logging and checkpoints included);
- peak resident memory: the process's high-water mark, whole, and its working memory: the peak less the
  process's size once the libraries were imported (what the model, the optimizer, activations, the data and
  the framework's running state cost). Ours imports torch, Lightning and our package, and TensorBoard and
  the loggers when the run starts, which the working memory counts;
- held-out bits/byte: every validation window of the corpus, the final weights, the same code for both
  (not for the plain script, which has no validation split).

Written with the command, the CPU and its instruction sets to bench/results/peers-cpu.md, with a plot.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import train  # noqa: E402
from bench import plots  # noqa: E402
from bench.loop import SEGMENTS, StepMarks, forever, held_out_bits, medians, plain_loop, step_segments  # noqa: E402
from bench.machine import device_name, load_average  # noqa: E402
from bench.plain_peer import build_peer, next_byte_loss  # noqa: E402
from bench.rss import current_rss, peak_rss  # noqa: E402
from sparse_transformer.data import ByteTextDataModule  # noqa: E402
from sparse_transformer.data.text import EMBEDDED_CORPUS  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.training.lightning_module import adamw_with_schedule  # noqa: E402

CONFIG = ROOT / "configs" / "quickstart.yaml"  # 4 layers, d=192, 6 heads, lr 2e-3, warmup 50
SEED = 1337  # the quickstart's seed_everything
LR, BETAS, WEIGHT_DECAY, WARMUP, MIN_LR_RATIO = 2e-3, (0.9, 0.95), 0.01, 50, 0.1  # what the quickstart trains with
SIZE = {"d_model": 192, "n_layers": 4, "n_heads": 6, "ffn_mult": 4}

# Our pattern at each N. Block size and stride set the density (the share of causal tiles computed, whole
# diagonal tiles counted; :func:`density`, written in every record):
# - 256: the quickstart's own (strided, stride 64 in blocks of 32, heads split): density 0.569.
# - 2048, 8192: fixed with heads split (half the heads read their own chunk of `stride`, half the last block
#   of every chunk, the paper's enwik8 pattern), stride ~ sqrt(N * block) so both halves are about equally
#   sparse: density 0.138 at 2048 (stride 256, blocks of 32) and 0.095 at 8192 (stride 704 = 11 blocks of 64).
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
    options += ["--trainer.accelerator", "cpu"]  # where the peer trains, on any machine
    options += ["--data.init_args.seq_len", str(args.seq_len), "--data.init_args.batch_size", str(args.batch)]
    options += ["--data.init_args.samples_per_epoch", str(args.steps * args.batch), "--trainer.max_steps", str(args.steps)]
    options += ["--trainer.limit_val_batches", "0", "--samples.every_n_val", "0", "--trainer.enable_progress_bar", "false"]
    options += [f"--model.network.pattern.{key}={value}" for key, value in pattern.items()]
    options += [f"--model.network.{key}={value}" for key, value in SIZE.items()]
    options += [f"--model.{key}={value}" for key, value in (("lr", LR), ("warmup_steps", WARMUP), ("min_lr_ratio", MIN_LR_RATIO))]
    return options


Watch = Callable[[torch.nn.Module], None] | None  # sees the model before training (bench/breakdown.py's hooks)


def train_ours(args: argparse.Namespace, root: Path, watch: Watch = None) -> tuple[LightningCLI, list[list[float]]]:
    """Through train.py's CLI, as ``train.py fit`` runs it: the CLI and the steps' marks (``bench/loop.py``)."""
    cli = train.main(ours_options(args, root), run=False)
    if watch:
        watch(cli.model.model)
    marks = StepMarks()
    cli.trainer.callbacks.insert(0, marks)  # first, so its batch end comes right after the optimizer step
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, marks.marks


def train_peer(args: argparse.Namespace, watch: Watch = None) -> tuple[torch.nn.Module, ByteTextDataModule, list[list[float]]]:
    """The peer in the plain loop, on our DataModule's batches: the model, the DataModule and the steps' marks."""
    torch.manual_seed(SEED)
    model = build_peer(args.seq_len, **SIZE)
    if watch:
        watch(model)
    dm = data(args.seq_len, args.batch, args.steps)
    dm.setup("fit")
    optimizer, schedule = adamw_with_schedule(model.parameters(), LR, BETAS, WEIGHT_DECAY, WARMUP, MIN_LR_RATIO, args.steps)
    model.train()
    batches = forever(dm.train_dataloader)
    marks = plain_loop(lambda b: next_byte_loss(model, b), list(model.parameters()), optimizer, schedule, batches, args.steps)
    return model, dm, marks


def run_ours(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    base = current_rss()
    cli, marks = train_ours(args, root)
    peak = peak_rss()
    model = cli.model.model.eval()
    bits = held_out_bits(model, cli.datamodule.val_dataloader(), limit=0)
    return {"marks": marks, "base": base, "peak": peak, "bits": bits, "params": model.num_params()}


def run_peer(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import x_transformers  # noqa: F401  (imported before the baseline, as ours imports its package)

    base = current_rss()
    model, dm, marks = train_peer(args)
    peak = peak_rss()
    bits = held_out_bits(model.eval(), dm.val_dataloader(), limit=0)
    return {"marks": marks, "base": base, "peak": peak, "bits": bits, "params": sum(p.numel() for p in model.parameters())}


def child(args: argparse.Namespace) -> None:
    """One run in this process; its row as JSON to ``--result``."""
    with tempfile.TemporaryDirectory() as tmp:
        run = run_peer(args, Path(tmp)) if args.side == "peer" else run_ours(args, Path(tmp))
    steps = step_segments(run.pop("marks"))[args.skip :]
    row = {
        "tokens_per_s": args.batch * args.seq_len * len(steps) / sum(s["total"] for s in steps),
        "step_ms": {k: 1e3 * v for k, v in medians(steps).items()},
        "base_mib": run["base"] / 2**20,
        "peak_mib": run["peak"] / 2**20,
        "growth_mib": (run["peak"] - run["base"]) / 2**20,
        "bits": run["bits"],
        "params": run["params"],
    }
    write_atomic(args.result, json.dumps(row))


def run_in_subprocess(side: str, n: int, batch: int, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run in a fresh process: its row, with the load before it and the wall-clock time."""
    load, started = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        shape = ["--seq-len", str(n), "--batch", str(batch), "--steps", str(steps), "--skip", str(args.skip)]
        if side == "plain":
            size = ["--d-model", str(SIZE["d_model"]), "--layers", str(SIZE["n_layers"]), "--heads", str(SIZE["n_heads"])]
            size += ["--ffn-mult", str(SIZE["ffn_mult"]), "--lr", str(LR), "--seed", str(SEED), "--text", str(EMBEDDED_CORPUS)]
            command = [sys.executable, str(ROOT / "bench" / "plain_peer.py"), *shape, *size]
        else:
            command = [sys.executable, __file__, "--child", side, *shape, "--result", str(result)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{side} at N={n} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.splitlines()[-1] if side == "plain" else result.read_text())
    row.setdefault("bits", None)  # the plain script has no validation split
    return {"side": side, "n": n, "batch": batch, "steps": steps, "load": load, **row, "wall_s": time.perf_counter() - started}


LABELS = {"peer": "peer", "plain": "peer, plain script", "ours": "ours", "dense": "ours, dense"}


def pattern_text(n: int, side: str) -> str:
    if side in ("peer", "plain"):
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


def spread(values: list[float], fmt: str) -> str:
    """The median, and the range where there is more than one value: ``1.20 (1.15 to 1.22)``."""
    median = format(statistics.median(values), fmt)
    return median if len(values) == 1 else f"{median} ({format(min(values), fmt)} to {format(max(values), fmt)})"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, started: str, loads: tuple[str, str]) -> str:
    """The record: speed and bits, memory, and every run in the order it ran."""
    order = "the order of the sides reversed every round" if args.rounds > 1 else "one round: every N in the order below"
    lines = [
        f"# Against a dense peer on {device_name('cpu')}",
        "",
        f"- command: `{command}`",
        f"- date: {started}; torch {torch.__version__}, lightning {L.__version__}, x-transformers {version('x-transformers')}; "
        f"float32; load average (1, 5, 15 min) before the first run: {loads[0]}, after the last: {loads[1]}",
        f"- ran: {args.rounds} round(s) per N, each run its own process, {order}; the runs table lists each with the load before it",
        f"- both: 4 layers, d=192, 6 heads of 32, feed-forward 768; the shipped corpus; the steps of the table, the first "
        f"{args.skip} not timed; AdamW lr {LR:g}, betas {BETAS}, weight decay {WEIGHT_DECAY} on matrices, "
        f"{WARMUP} warmup steps then cosine to {MIN_LR_RATIO:g}x, clipping at 1.0; seed {SEED}",
        "- ours: `train.py fit --config configs/quickstart.yaml` with the options above (every callback and logger, "
        "checkpoints; validation and samples off while training); the peer: x-transformers `TransformerWrapper(Decoder("
        "attn_flash=True))` in a plain loop on our DataModule's windows; the peer, plain script: the same model in "
        "`bench/plain_peer.py`, a process that imports torch and x-transformers only (random training windows, "
        "constant lr), for the memory a user of the peer sees",
        "",
        "| N | batch | steps | model | pattern | tokens/s | x peer | step ms (fwd / bwd / opt / between) | held-out bits/byte | vs peer |",
        "|---:|---:|---:|---|---|---:|---:|---|---:|---:|",
    ]
    groups = _groups(rows)
    summary: dict[str, dict[int, dict[str, Any]]] = {}
    for (n, batch), sides in groups.items():
        peer_bits = statistics.median(r["bits"] for r in sides["peer"])
        for side, runs in sides.items():
            row = summary.setdefault(side, {})[n] = _median(runs)
            ms = row["step_ms"]
            segments = " / ".join(f"{ms[k]:.0f}" for k in SEGMENTS) if SEGMENTS[0] in ms else "-"
            bits = "- | -" if row["bits"] is None else f"{row['bits']:.3f} | {row['bits'] - peer_bits:+.3f}"
            lines.append(
                f"| {n} | {batch} | {row['steps']} | {LABELS[side]} | {pattern_text(n, side)} | "
                f"{spread([r['tokens_per_s'] for r in runs], ',.0f')} | {spread(_ratios(runs, sides['peer'], 'tokens_per_s'), '.2f')} | "
                f"{ms['total']:.0f} ({segments}) | {bits} |"
            )
    lines += [
        "",
        "tokens/s: training tokens of the timed steps over their time, from one batch's start to the next's (data, hooks, "
        "logging and checkpoint writes included): the median over rounds (min to max). x peer: the median (min to max) of each "
        "round's ratio to the peer's run in that round. step ms: the median step of the rounds' median steps and its "
        "segments (forward + loss, backward, optimizer with clipping, and between: data, logging, hooks; `bench/loop.py`). "
        "held-out bits/byte: every validation window of the corpus (its 5% before the test split), final weights, one code "
        "path for both: the median over rounds.",
        "",
        "| N | model | imports | peak RSS MiB | x plain peer | working MiB | x plain peer | after imports MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    imports = {"peer": "torch, Lightning, ours, x-transformers", "plain": "torch, x-transformers"}
    for (n, _), sides in groups.items():
        for side, runs in sides.items():
            plain = sides.get("plain", runs)
            lines.append(
                f"| {n} | {LABELS[side]} | {imports.get(side, 'torch, Lightning, ours')} | {spread([r['peak_mib'] for r in runs], '.0f')} | "
                f"{spread(_ratios(runs, plain, 'peak_mib'), '.2f')} | {spread([r['growth_mib'] for r in runs], '.0f')} | "
                f"{spread(_ratios(runs, plain, 'growth_mib'), '.2f')} | {spread([r['base_mib'] for r in runs], '.0f')} |"
            )
    lines += [
        "",
        "peak RSS: the process's resident high-water mark, the whole process, as a user sees it; working: that peak less "
        "the process's size once its libraries were imported, before the model was built (model, optimizer, activations, "
        "data, and for ours the loggers Lightning starts); x plain peer: each round's ratio to the plain script's run; "
        "median over rounds (min to max).",
        "",
        "| N | round | model | load before (1, 5, 15 min) | tokens/s | peak RSS MiB | wall s |",
        "|---:|---:|---|---|---:|---:|---:|",
        *(
            f"| {r['n']} | {r['round']} | {LABELS[r['side']]} | {r['load']} | {r['tokens_per_s']:,.0f} | {r['peak_mib']:.0f} | {r['wall_s']:.0f} |"
            for r in rows
        ),
        "",
        "Sparse densities (share of causal tiles computed): "
        + ", ".join(f"N={n}: {density(n):.3f}" for n in sorted({r["n"] for r in rows})),
    ]
    path = (args.out or ROOT / "bench" / "results" / "peers-cpu.md").with_suffix(".png")
    lines += ["", plots.peers(summary, path, f"ours vs x-transformers (dense, flash SDPA), {device_name('cpu')}")]
    return "\n".join(lines) + "\n"


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, list[dict[str, Any]]]]:
    """Runs by (N, batch), then by side, in the order they ran."""
    groups: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault((r["n"], r["batch"]), {}).setdefault(r["side"], []).append(r)
    return {key: dict(sorted(sides.items(), key=lambda item: list(LABELS).index(item[0]))) for key, sides in groups.items()}


def _ratios(runs: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str) -> list[float]:
    """Each round's ``key`` over the baseline's run in the same round."""
    by_round = {r["round"]: r[key] for r in baseline}
    return [r[key] / by_round[r["round"]] for r in runs if r["round"] in by_round]


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A side's rounds as one row: the median of each figure."""
    out = dict(runs[0])
    for key in ("tokens_per_s", "peak_mib", "growth_mib", "base_mib", *(("bits",) if out["bits"] is not None else ())):
        out[key] = statistics.median(r[key] for r in runs)
    out["step_ms"] = {k: statistics.median(r["step_ms"][k] for r in runs) for k in runs[0]["step_ms"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["256:16", "2048:2", "8192:1"], help="N:batch or N:batch:steps")
    p.add_argument("--steps", type=int, default=200, help="training steps per run where a case does not say")
    p.add_argument("--skip", type=int, default=5, help="first steps of a run not timed (allocation, caches)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each side per N, the order reversed every round")
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
    if args.rounds < 1:
        sys.exit(f"error: --rounds {args.rounds} must be at least 1")
    cases = parse_cases(args.cases, args.steps, args.skip)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    first_load = load_average()
    sides = ["peer", "ours", *(["dense"] if args.dense else []), "plain"]
    rows = []
    out = args.out or ROOT / "bench" / "results" / "peers-cpu.md"
    for n, batch, steps in cases:
        for r, side in run_order(sides, args.rounds):
            row = {**run_in_subprocess(side, n, batch, steps, args), "round": r}
            rows.append(row)
            bits = "" if row["bits"] is None else f", {row['bits']:.3f} bits/byte"
            print(
                f"N={n} batch={batch} round {r}: {LABELS[side]}: {row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_mib']:.0f} MiB "
                f"({row['growth_mib']:.0f} working){bits}, load before {row['load']}, {row['wall_s']:.0f} s",
                flush=True,
            )
        command = shlex.join(["python", "bench/peers.py", *sys.argv[1:]])
        text = report(rows, args, command, started, (first_load, load_average()))
        write_atomic(out, text)  # after every N, so a long run's finished contexts are kept
    print(f"\n{text}\nwritten to {out}")


def run_order(sides: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, side) in the order they run: the sides' order reversed every round, so none always goes first."""
    return [(r, side) for r in range(rounds) for side in (sides if r % 2 == 0 else sides[::-1])]


def parse_cases(cases: list[str], steps: int, skip: int) -> list[tuple[int, int, int]]:
    """``N:batch`` or ``N:batch:steps`` -> (N, batch, steps); a bad one exits with a one-line error."""
    parsed = []
    for case in cases:
        fields = case.split(":")
        if len(fields) not in (2, 3) or not all(f.isdigit() and int(f) > 0 for f in fields):
            sys.exit(f"error: --cases {case!r} must be N:batch or N:batch:steps, e.g. 2048:2 or 8192:1:60")
        n, batch, case_steps = (*map(int, fields), steps)[:3]
        if case_steps <= skip + 1:
            sys.exit(f"error: {case_steps} steps at N={n} must exceed --skip {skip} + 1")
        parsed.append((n, batch, case_steps))
    return parsed


if __name__ == "__main__":
    main()
