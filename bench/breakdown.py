"""Where a training step's time goes, part by part, for ours and the dense peer of bench/peers.py.

    pip install -e '.[peers]'
    python bench/breakdown.py                        # N=256 (batch 16, 60 steps), N=8192 (batch 1, 25 steps); 3 rounds
    python bench/breakdown.py --cases 256:16:20 --rounds 1

Both sides train as bench/peers.py trains them (ours through train.py's CLI with every callback and logger, the
peer in the plain loop of bench/loop.py; the same windows, AdamW, schedule and seed), each run in its own
process, the order of the sides reversed every round. Module hooks, put on from outside, take the time at every
boundary between two parts: forward, a pre-hook on the module that starts a part; backward, a hook on the
gradient of that module's input, complete once the part after it has run its backward. So every moment of a
step belongs to one part, and the parts add up to the step:

- embeddings: forward, from the model's call to the first layer's input (token and position embeddings);
  backward, from the first layer's input gradient to the end of ``backward()`` (their weight gradients);
- attention: the whole sublayer (pre-norm, q/k/v projections, attention, output projection, residual add);
  "of which the kernel": from the last q/k/v projection to the output projection, that is the head reshapes
  and the attention call (our block-sparse backend; the peer's SDPA);
- MLP: the whole sublayer (pre-norm, two linear layers, GELU, residual add);
- loss: final norm, head and cross-entropy (ours: also ``training_step``'s logging and ``zero_grad``); its
  backward from the start of ``backward()`` to the final norm's input gradient (the peer: also ``zero_grad``);
- optimizer: clipping and AdamW (ours: as Lightning calls them);
- loop: the rest of the step (data, the schedule, Lightning's hooks and logging, the model's call).

On a CPU an op has finished when the next Python line runs, so a part's time is the time of its ops; the hooks
cost a few microseconds each, about 50 a step. CPU only, where the peer trains. Written with the command, the
CPU and the load to bench/results/breakdown-cpu.md.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.machine import device_name, load_average  # noqa: E402
from bench.peers import parse_cases, pattern_text, run_order, spread, train_ours, train_peer  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402

PARTS = (
    "embeddings forward", "embeddings backward", "attention forward", "attention backward",
    "kernel forward", "kernel backward", "MLP forward", "MLP backward", "loss forward", "loss backward",
    "optimizer", "loop",
)  # fmt: skip
LOOP_MARKS = ("loop", "loss backward", "optimizer", "loop")  # what each of a step's marks (bench/loop.py) starts


@dataclass
class Boundaries:
    """The modules that start the parts of a forward pass. Ours and the peer name them differently:

    ======================  ==============================  ==========================================
    part                    ours (SparseTransformer)        the peer (x-transformers TransformerWrapper)
    ======================  ==============================  ==========================================
    embeddings              the model                       the wrapper
    attention               ``blocks[i].norm1``             ``attn_layers.layers[j][0][0]``, an "a" layer
    MLP                     ``blocks[i].norm2``             ``attn_layers.layers[j][0][0]``, an "f" layer
    loss                    ``norm``                        ``attn_layers.final_norm``
    kernel (starts | ends)  ``attn.qkv`` | ``attn.proj``    ``to_q``, ``to_k``, ``to_v`` | ``to_out``
    ======================  ==============================  ==========================================
    """

    model: nn.Module
    sublayers: list[tuple[str, nn.Module]]  # ("attention" or "MLP", the pre-norm that starts it), in order
    final_norm: nn.Module
    kernels: list[tuple[list[nn.Module], nn.Module]]  # per attention sublayer: (q/k/v projections, output projection)


def our_boundaries(model: nn.Module) -> Boundaries:
    return Boundaries(
        model=model,
        sublayers=[(part, norm) for b in model.blocks for part, norm in (("attention", b.norm1), ("MLP", b.norm2))],
        final_norm=model.norm,
        kernels=[([b.attn.qkv], b.attn.proj) for b in model.blocks],
    )


def peer_boundaries(model: nn.Module) -> Boundaries:
    decoder = model.attn_layers  # layers[j] = (pre-norms, attention or feed-forward, residual), of layer_types[j]
    layers = [
        ({"a": "attention", "f": "MLP"}[kind], norms[0], block)
        for kind, (norms, block, _) in zip(decoder.layer_types, decoder.layers)
    ]
    return Boundaries(
        model=model,
        sublayers=[(part, norm) for part, norm, _ in layers],
        final_norm=decoder.final_norm,
        kernels=[([b.to_q, b.to_k, b.to_v], b.to_out) for part, _, b in layers if part == "attention"],
    )


class Timeline:
    """What starts when, as the hooks see it: ``(perf_counter seconds, part)`` in the order it happens."""

    def __init__(self):
        self.events: list[tuple[float, str]] = []

    def mark(self, part: str) -> None:
        self.events.append((time.perf_counter(), part))

    def watch(self, boundaries: Boundaries) -> None:
        starts = [("embeddings", boundaries.model), *boundaries.sublayers, ("loss", boundaries.final_norm)]
        for before, (part, module) in zip([None, *(part for part, _ in starts)], starts):
            module.register_forward_pre_hook(self._starts(part, before))
        for projections, out in boundaries.kernels:
            for projection in projections:
                projection.register_forward_hook(self._kernel_starts)
            out.register_forward_pre_hook(self._kernel_ends)

    def _starts(self, part: str, before: str | None):
        """``part`` starts forward; its input's gradient, once complete, starts the backward of the part before it."""

        def hook(module: nn.Module, args: tuple) -> None:
            self.mark(f"{part} forward")
            if before is not None and args[0].requires_grad:
                args[0].register_hook(lambda grad: self.mark(f"{before} backward"))

        return hook

    def _kernel_starts(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.mark("kernel forward")
        if output.requires_grad:
            output.register_hook(lambda grad: self.mark("kernel backward end"))

    def _kernel_ends(self, module: nn.Module, args: tuple) -> None:
        self.mark("kernel forward end")
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: self.mark("kernel backward"))


def step_parts(marks: list[list[float]], events: list[tuple[float, str]]) -> list[dict[str, float]]:
    """Seconds of each of :data:`PARTS` and the whole ``step``, per step. Between two boundaries, the time goes to
    the part the first one starts; the kernel is timed apart, inside attention: from its last start to its
    first end (forward: the last of q, k, v to the output projection; backward: the other way)."""
    kernel = [e for e in events if e[1].startswith("kernel")]
    boundaries = sorted(
        [e for e in events if not e[1].startswith("kernel")] + [e for m in marks[:-1] for e in zip(m, LOOP_MARKS)]
    )
    steps = []
    for this, following in zip(marks, marks[1:]):
        start, end = this[0], following[0]
        inside = [e for e in boundaries if start <= e[0] < end]
        times = dict.fromkeys(PARTS, 0.0)
        for (t, part), (t_next, _) in zip(inside, [*inside[1:], (end, "")]):
            times[part] += t_next - t
        opened: dict[str, float] = {}
        for t, what in (e for e in kernel if start <= e[0] < end):
            phase = what.removesuffix(" end")
            if what == phase:
                opened[phase] = t
            elif phase in opened:
                times[phase] += t - opened.pop(phase)
        steps.append({**times, "step": end - start})
    return steps


def child(args: argparse.Namespace) -> None:
    """One run in this process; per part, the median over its timed steps in ms, as JSON to ``--result``."""
    timeline = Timeline()
    run = argparse.Namespace(side=args.child, seq_len=args.seq_len, batch=args.batch, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        if args.child == "peer":
            marks = train_peer(run, watch=lambda model: timeline.watch(peer_boundaries(model)))[2]
        else:
            marks = train_ours(run, Path(tmp), watch=lambda model: timeline.watch(our_boundaries(model)))[1]
    steps = step_parts(marks, timeline.events)[args.skip :]
    write_atomic(args.result, json.dumps({k: 1e3 * statistics.median(s[k] for s in steps) for k in (*PARTS, "step")}))


def run_in_subprocess(side: str, n: int, batch: int, steps: int, skip: int) -> dict[str, Any]:
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--child", side, "--seq-len", str(n), "--batch", str(batch)]
        command += ["--steps", str(steps), "--skip", str(skip), "--result", str(result)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{side} at N={n} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return {"side": side, "n": n, "batch": batch, "steps": steps, "load": load, "ms": json.loads(result.read_text())}


def table(runs: list[dict[str, Any]]) -> list[str]:
    """One case: each part's median over rounds (min to max) per side, ours less the peer's per round, and each
    part's share of its side's step."""
    peer = [r["ms"] for r in runs if r["side"] == "peer"]
    ours = [r["ms"] for r in runs if r["side"] == "ours"]
    lines = [
        "| part | peer ms | ours ms | ours - peer ms | peer share | ours share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    peer_step, our_step = (statistics.median(r["step"] for r in side) for side in (peer, ours))
    for part in (*PARTS, "step"):
        label = {"kernel forward": "of which the kernel, forward", "kernel backward": "of which the kernel, backward"}.get(
            part, part
        )
        p, o = [r[part] for r in peer], [r[part] for r in ours]
        lines.append(
            f"| {label} | {spread(p, '.1f')} | {spread(o, '.1f')} | {spread([b - a for a, b in zip(p, o)], '+.1f')} | "
            f"{statistics.median(p) / peer_step:.0%} | {statistics.median(o) / our_step:.0%} |"
        )
    sums = [
        sum(statistics.median(r[part] for r in side) for part in PARTS if not part.startswith("kernel")) for side in (peer, ours)
    ]
    lines.append(f"| sum of the parts' medians | {sums[0]:.1f} | {sums[1]:.1f} | {sums[1] - sums[0]:+.1f} | | |")
    return lines


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, started: str, loads: tuple[str, str]) -> str:
    order = "the order of the sides reversed every round" if args.rounds > 1 else "one round, the peer first"
    lines = [
        f"# Where a training step goes, ours and the dense peer, on {device_name('cpu')}",
        "",
        f"- command: `{command}`",
        f"- date: {started}; torch {torch.__version__}; float32; load average (1, 5, 15 min) before the first run: {loads[0]}, "
        f"after the last: {loads[1]}",
        f"- ran: {args.rounds} round(s) per case, each run its own process, {order}; the first {args.skip} steps of a run not "
        "timed; each figure is a run's median step, then the median over rounds (min to max)",
        "- both trained as `bench/peers.py` trains them: ours through `train.py fit` (every callback and logger), the peer "
        "(x-transformers, flash SDPA) in a plain loop; the parts are defined in `bench/breakdown.py`'s docstring",
    ]
    for n, batch, steps in parse_cases(args.cases, args.steps, args.skip):
        runs = [r for r in rows if (r["n"], r["batch"]) == (n, batch)]
        if runs:
            lines += ["", f"## N={n}, batch {batch}, {steps} steps; ours: {pattern_text(n, 'ours')}", "", *table(runs)]
    lines += [
        "",
        "The parts' medians need not add up to the median step. The kernel is part of attention. ours - peer: the "
        "difference within each round.",
        "",
        "| N | round | model | load before (1, 5, 15 min) | step ms |",
        "|---:|---:|---|---|---:|",
        *(f"| {r['n']} | {r['round']} | {r['side']} | {r['load']} | {r['ms']['step']:.1f} |" for r in rows),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["256:16:60", "8192:1:25"], help="N:batch or N:batch:steps")
    p.add_argument("--steps", type=int, default=60, help="training steps per run where a case does not say")
    p.add_argument("--skip", type=int, default=5, help="first steps of a run not timed (allocation, caches)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each side per case, the order reversed every round")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "breakdown-cpu.md")
    p.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    try:
        import x_transformers  # noqa: F401
    except ImportError:
        sys.exit("error: bench/breakdown.py needs x-transformers: pip install -e '.[peers]'")
    if args.rounds < 1:
        sys.exit(f"error: --rounds {args.rounds} must be at least 1")
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    first_load = load_average()
    command = shlex.join(["python", "bench/breakdown.py", *sys.argv[1:]])
    rows = []
    for n, batch, steps in parse_cases(args.cases, args.steps, args.skip):
        for r, side in run_order(["peer", "ours"], args.rounds):
            rows.append({**run_in_subprocess(side, n, batch, steps, args.skip), "round": r})
            print(f"N={n} batch={batch} round {r}: {side}: {rows[-1]['ms']['step']:.1f} ms/step", flush=True)
        text = report(rows, args, command, started, (first_load, load_average()))
        write_atomic(args.out, text)  # after every case, so a long run's finished cases are kept
    print(f"\n{text}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
