"""``model.network.compile`` on the CPU: training steps of compiled blocks against eager ones, and what the
compile costs, in one process.

    python bench/compile.py                                # N=256 (batch 16) and N=2048 (batch 2)
    python bench/compile.py --cases 256:16 --steps 10 --rounds 1

Both models come from the quickstart config through train.py's CLI (the pattern of bench/peers.py at each N),
the compiled one with ``--model.network.compile true`` and the eager one's weights. Each trains in the plain
loop of bench/loop.py (same batches, AdamW, schedule, clipping), in rounds that alternate the two. The compile
time is the compiled model's first step less an eager step: a cold compile, since Inductor's caches are off
here (a second run of a user's job reads them from disk). Written with the command to
bench/results/compile-cpu.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")  # a cold compile, as a user's first run pays
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import argparse  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import train  # noqa: E402
from bench.loop import forever, plain_loop, step_segments  # noqa: E402
from bench.machine import device_name, load_average  # noqa: E402
from bench.peers import CONFIG, sparse_settings  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402


def build(n: int, batch: int, steps: int, compile: bool, root: Path):
    pattern = [f"--model.network.pattern.{key}={value}" for key, value in sparse_settings(n).items()]
    options = ["--config", str(CONFIG), "--trainer.default_root_dir", str(root), "--data.init_args.seq_len", str(n)]
    options += ["--data.init_args.batch_size", str(batch), "--trainer.max_steps", str(steps), *pattern]
    options += ["--model.network.compile", str(compile).lower()]
    return train.main(options, run=False)


def measure(n: int, batch: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    total = args.steps * args.rounds + 1
    eager, compiled = (build(n, batch, total, c, root / str(c)) for c in (False, True))
    compiled.model.load_state_dict(eager.model.state_dict())
    sides = {}
    for name, cli in (("eager", eager), ("compiled", compiled)):
        cli.datamodule.setup("fit")
        optimizer, schedule = cli.model.optimizer_and_schedule(total)
        cli.model.train()
        sides[name] = (cli.model, optimizer, schedule, forever(cli.datamodule.train_dataloader))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    first = {}
    for r in range(args.rounds):
        for name in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
            module, optimizer, schedule, batches = sides[name]
            marks = plain_loop(module._loss, list(module.parameters()), optimizer, schedule, batches, args.steps + (r == 0))
            steps = [s["total"] for s in step_segments(marks)]
            if r == 0:
                first[name], steps = steps[0], steps[1:]
            times[name] += steps
            print(f"N={n} round {r}: {name}: median {1e3 * statistics.median(steps):.1f} ms/step", flush=True)
    eager_ms, compiled_ms = (1e3 * statistics.median(times[k]) for k in ("eager", "compiled"))
    return {
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "compile_s": first["compiled"] - eager_ms / 1e3,
        "tokens": batch * n,
        "steps": len(times["eager"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["256:16", "2048:2"], help="N:batch pairs")
    p.add_argument("--steps", type=int, default=15, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running both sides")
    p.add_argument("--out", type=Path, help="default: bench/results/compile-cpu.md")
    args = p.parse_args()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            n, batch = (int(x) for x in case.split(":"))
            rows.append((n, batch, measure(n, batch, args, Path(tmp) / case.replace(":", "-"))))
    lines = [
        f"# torch.compile of the blocks on {device_name('cpu')}",
        "",
        f"- command: `{shlex.join(['python', 'bench/compile.py', *sys.argv[1:]])}`",
        f"- date: {started}; torch {torch.__version__}, lightning {L.__version__}; float32; load before the runs: {load}",
        f"- the quickstart's model (4 layers, d=192, 6 heads), the pattern of bench/peers.py at each N; {args.rounds} "
        f"rounds of {args.steps} steps per side, alternating; Inductor's caches off (a cold compile)",
        "",
        "| N | batch | pattern | eager ms / step | compiled ms / step | eager tokens/s | compiled tokens/s | x eager | compile s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, batch, m in rows:
        s = sparse_settings(n)
        pattern = f"{s['kind']} ({s['heads']}), stride {s['stride']}, block {s['block_size']}"
        lines.append(
            f"| {n} | {batch} | {pattern} | {m['eager_ms']:.1f} | {m['compiled_ms']:.1f} | {m['tokens'] / m['eager_ms'] * 1e3:,.0f} | "
            f"{m['tokens'] / m['compiled_ms'] * 1e3:,.0f} | {m['eager_ms'] / m['compiled_ms']:.2f} | {m['compile_s']:.1f} |"
        )
    lines += [
        "",
        "A step: loss, backward, clipping, AdamW and the schedule in the plain loop (bench/loop.py), medians. "
        "Compiled: each block through torch.compile (Inductor), the attention kernel (auto: cpp on the CPU) one eager call "
        "inside it; embeddings, the head and the loss stay eager. compile s: the compiled model's first step less "
        "an eager step (Dynamo, AOTAutograd and Inductor for the forward and backward graphs).",
    ]
    text = "\n".join(lines) + "\n"
    out = args.out or ROOT / "bench" / "results" / "compile-cpu.md"
    write_atomic(out, text)
    print(f"\n{text}\nwritten to {out}")


if __name__ == "__main__":
    main()
