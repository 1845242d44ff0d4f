"""A training step on a busy machine: how much one other busy process slows it, per OpenMP setting.

    python bench/busy.py                                  # the quickstart's model, every setting, 2 rounds
    python bench/busy.py --settings default spin-10k spin-1k --rounds 3 --steps 30

PyTorch's CPU threads (GNU OpenMP, libgomp, in PyPI's Linux builds) spin-wait between parallel regions: at its
default a thread spins about 300,000 times before it sleeps. On an idle machine that saves the wake-up between
the many small regions of a step; beside another busy process a spinning thread burns the time slice its
partner needs to finish the region, and a step slows far more than its fair share of the cores. Each setting
runs a training step (``bench/overhead.py``'s plain loop over the config's model, data and optimizer) in a
fresh process, since libgomp reads its settings once, when torch loads it: on an otherwise idle machine and
beside one competing process (one thread spinning in Python), alternating settings and conditions in rounds
so a drift in the machine's speed falls on all alike. The table gives median ms per step, the idle cost against
libgomp's default and the slowdown under load, and is written with the command to bench/results/busy-cpu.md.
``spin-10k`` and ``spin-1k`` are what ``sparse_transformer/threads.py`` sets for train.py and sample.py on an idle
and on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.machine import cpu_name  # noqa: E402
from sparse_transformer import threads  # noqa: E402  (imports no torch)
from sparse_transformer.files import write_atomic  # noqa: E402

CORES = os.cpu_count() or 1
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},  # libgomp's own: spin 300,000 times, then sleep
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # sleep at once
    "spin-100k": {"GOMP_SPINCOUNT": "100000"},
    "spin-10k": threads.IDLE,  # what threads.py sets on an idle machine
    "spin-1k": threads.BUSY,  # ... and on a busy one
    "one-thread": {"OMP_NUM_THREADS": "1"},
}
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME", threads.SWITCH)


def worker(args: argparse.Namespace) -> None:
    """Time the steps in this process and print them as JSON (the parent set the environment)."""
    import torch

    from bench.loop import step_segments
    from bench.overhead import plain_marks

    with tempfile.TemporaryDirectory() as tmp:
        marks = plain_marks(argparse.Namespace(config=args.config, steps=args.skip + args.steps + 1), Path(tmp))
    steps = [step["total"] for step in step_segments(marks)]
    print(json.dumps({"steps": steps[args.skip :], "threads": torch.get_num_threads()}))


def spin() -> None:
    """The competing process: one thread, busy."""
    while True:
        pass


def run_setting(name: str, busy: bool, args: argparse.Namespace) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(SETTINGS[name], **{threads.SWITCH: "off"})  # the setting alone, not the project's on top
    competitor = subprocess.Popen([sys.executable, __file__, "--spin"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        command = [sys.executable, __file__, "--worker", "--config", str(args.config), "--steps", str(args.steps),
                   "--skip", str(args.skip)]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])["steps"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=[s for s in SETTINGS if s != "spin-100k"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--skip", type=int, default=5, help="steps run first, untimed")
    p.add_argument("--rounds", type=int, default=2, help="rounds over every setting and condition")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "busy-cpu.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.spin:
        return spin()
    if args.worker:
        return worker(args)
    started, load = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), os.getloadavg()
    times: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        for name in args.settings:
            for busy in (False, True):
                steps = run_setting(name, busy, args)
                times.setdefault((name, busy), []).extend(steps)
                print(f"round {r}: {name:10} {'busy' if busy else 'idle'}: median {1e3 * statistics.median(steps):.1f} ms/step", flush=True)
    median = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    base = median.get(("default", False))
    lines = [
        f"# A training step beside one busy process on {cpu_name()}",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date: {started}; load average at the start {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) on {CORES} cores"
        + (" - a shared machine: other work ran beside these runs" if load[0] > 0.5 else ""),
        f"- config: `{args.config}`; {args.rounds} rounds, each setting idle and busy in turn; {args.steps} steps timed per run "
        f"after {args.skip}; the competitor: one Python thread spinning",
        f"- what `sparse_transformer/threads.py` sets for train.py and sample.py: {threads.describe()}",
        "",
        "| setting | environment | idle ms/step | busy ms/step | idle cost vs default | slowdown when busy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in args.settings:
        idle, busy = median[name, False], median[name, True]
        env = " ".join(f"{k}={v}" for k, v in SETTINGS[name].items()) or "(none)"
        cost = f"{idle / base - 1:+.1%}" if base else "-"
        lines.append(f"| {name} | `{env}` | {idle:.1f} | {busy:.1f} | {cost} | {busy / idle:.2f}x |")
    lines += [
        "",
        "ms/step: median over every timed step of the rounds. Idle cost: this setting's idle time over the default's, "
        f"minus 1. Slowdown: busy over idle. With {CORES} cores and one competitor, a step that uses every core would "
        f"slow {(CORES + 1) / CORES:.2f}x with a fair share per thread and {CORES / max(CORES - 1, 1):.2f}x with a fair share per process.",
    ]
    text = "\n".join(lines) + "\n"
    write_atomic(args.out, text)
    print(f"\n{text}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
