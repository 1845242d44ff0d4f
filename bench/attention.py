"""Benchmark the attention backends: forward and forward+backward time, TFLOP/s and peak memory per N.

    python bench/attention.py                     # CUDA: every backend, N = 1024 ... 65536, bf16
    python bench/attention.py --device cpu --backends sdpa flex cpp pieces blocks --stride sqrt \\
        --seq-lens 2048 4096 8192 16384 --dtype float32
    TRITON_INTERPRET=1 python bench/attention.py --seq-lens 64 128 --heads 2 --head-dim 16 --block-size 16 \\
        --dtype float32

The sparse backends (triton, flex, cpp, pieces, blocks, reference) run the strided, fixed and local layouts of the
paper; ``sdpa`` is dense causal attention (torch's scaled_dot_product_attention, is_causal=True), the baseline
to beat. FlexAttention runs compiled on every device; on the CPU torch has no backward for it, so only its
forward is timed there. The table is printed and written as Markdown, with the command that made it, to
bench/results/attention-<device>.md, and a log-log plot of time against N beside it (with matplotlib, the
``bench`` extra: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench import plots  # noqa: E402
from bench.machine import device_name  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.model.kernels import get_backend  # noqa: E402
from sparse_transformer.model.kernels.cpp import available as cpp_available  # noqa: E402
from sparse_transformer.model.layout import BlockLayout  # noqa: E402
from sparse_transformer.model.patterns import AttentionPattern  # noqa: E402

BACKENDS = ("sdpa", "flex", "triton", "cpp", "pieces", "blocks", "reference")  # run in this order: the baselines first
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class Row:
    backend: str
    layout: str
    n: int
    density: float
    flops: float  # of the forward, on the layout's tiles; the backward counts 2.5 times as many
    fwd_ms: float | str  # or "OOM", "n/a", "error"
    fwd_bwd_ms: float | str
    peak_mib: float | str


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda if available")
    p.add_argument("--seq-lens", type=int, nargs="+", help="default: 1024 ... 65536 on CUDA, 1024 2048 4096 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--stride", default="128", help="l of strided and fixed: an int, raised to a whole number of "
                   "blocks (at least one), or 'sqrt': about sqrt(N / block size) blocks, the paper's l ~ sqrt(N) "
                   "counted in blocks")  # fmt: skip
    p.add_argument("--summary", type=int, default=32, help="c of fixed: summary positions per chunk")
    p.add_argument("--head-modes", nargs="+", choices=("interleaved", "merged", "split"), default=["merged"],
                   help="how the two rules share heads; interleaved runs both layers' rules (rule 1 as the '-L1' layout)")
    p.add_argument("--layouts", nargs="+", choices=("strided", "fixed", "local", "dense"), default=["strided", "fixed"])
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--reference-max-n", type=int, default=8192, help="skip the O(N^2) reference above this N")
    p.add_argument("--reps", type=int, default=1, help="CPU: timed runs per pass, best kept (CUDA: triton's do_bench)")
    p.add_argument("--passes", type=int, default=3, help="CPU: passes over all rows of a length, each row keeping its "
                   "best, so that a drift in the machine's speed falls on every row alike")  # fmt: skip
    p.add_argument("--warmup", type=int, default=1, help="CPU: untimed runs first")
    p.add_argument("--threads", type=int, help="CPU: torch.set_num_threads")
    p.add_argument("--out", type=Path, help="default: bench/results/attention-<device>.md")
    args = p.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    args.seq_lens = args.seq_lens or ([1024 << i for i in range(7)] if cuda else [1024, 2048, 4096])
    args.dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    if args.block_size < 1:
        p.error(f"--block-size={args.block_size} must be positive")
    bad = [n for n in args.seq_lens if n < 1 or n % args.block_size]
    if bad:
        p.error(f"--seq-lens {bad} are not positive multiples of --block-size={args.block_size}")
    if args.stride != "sqrt" and not (args.stride.isdigit() and int(args.stride) > 0):
        p.error(f"--stride={args.stride!r} must be a positive int or 'sqrt'")
    return args


def pattern(kind: str, n: int, args: argparse.Namespace, heads: str = "merged") -> AttentionPattern:
    """The pattern at length n, its l a whole number of blocks so the layout tiles it exactly."""
    bs = args.block_size
    if args.stride == "sqrt":
        l = max(1, round(math.sqrt(n / bs))) * bs
    else:
        l = max(1, -(-int(args.stride) // bs)) * bs
    return AttentionPattern(kind, block_size=bs, stride=l, summary=min(args.summary, l), heads=heads)


def layouts(n: int, args: argparse.Namespace) -> dict[str, BlockLayout]:
    """The layouts to run at length n, by name: ``strided``, ``strided-split``, ``strided-interleaved-L1``, ..."""
    out = {}
    for kind in args.layouts:
        if kind == "dense":
            out["dense"] = AttentionPattern("dense", block_size=args.block_size).layout(args.heads, n)
            continue
        for mode in args.head_modes if kind != "local" else ["merged"]:  # one rule: every mode is the same
            name = kind if mode == "merged" else f"{kind}-{mode}"
            layers = [0, 1] if mode == "interleaved" and kind != "local" else [0]
            for layer in layers:
                label = f"{name}-L{layer}" if len(layers) > 1 else name
                out[label] = pattern(kind, n, args, mode).layout(args.heads, n, layer)
    return out


def cases(n: int, attends: dict[str, Callable], args: argparse.Namespace) -> Iterator[tuple[str, Callable, str, torch.Tensor]]:
    """(backend, its function, layout name, layout) for every row at length n: sdpa on the causal
    layout, the O(N^2) reference only up to --reference-max-n, every other backend on every layout."""
    causal = {"causal": AttentionPattern("dense", block_size=args.block_size).layout(args.heads, n)}
    sparse = layouts(n, args)
    for name, attend in attends.items():
        if name == "reference" and n > args.reference_max_n:
            continue
        for kind, layout in (causal if name == "sdpa" else sparse).items():
            yield name, attend, kind, layout


def sdpa(q, k, v, layout, block_size, scale=None) -> torch.Tensor:
    """Dense causal attention with the backends' signature; the layout is ignored."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def compiled_flex(q, k, v, layout, block_size, scale=None) -> torch.Tensor:
    """FlexAttention compiled (torch.compile) with the layout's BlockMask: forward only on the CPU."""
    from sparse_transformer.model.kernels.flex import flex_block_mask

    if q.device.type == "cpu":
        if torch.is_grad_enabled() and q.requires_grad:
            raise NotImplementedError("FlexAttention has no backward on the CPU in torch 2.11")
        q, k, v = q.detach(), k.detach(), v.detach()  # it refuses CPU inputs that require grad, even under no_grad
    return _compile_flex()(q, k, v, block_mask=flex_block_mask(layout, block_size, q.device), scale=scale)


@functools.cache
def _compile_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def backends(args: argparse.Namespace, notes: list[str]) -> dict[str, Callable]:
    """The requested backends that can run here, baselines first; each one skipped gets a note saying why."""
    found = {}
    for name in (b for b in BACKENDS if b in args.backends):
        if name == "sdpa":
            found[name] = sdpa
        elif name == "flex":
            found[name] = compiled_flex
        elif name == "triton" and args.device.type != "cuda" and not INTERPRET:
            notes.append("triton skipped: needs CUDA, or TRITON_INTERPRET=1 to run in Triton's interpreter")
        elif name == "cpp" and (args.device.type != "cpu" or not cpp_available()):
            notes.append("cpp skipped: " + ("a CPU backend" if args.device.type != "cpu" else "its kernel could not be built here"))
        else:
            try:
                found[name] = get_backend(name, args.device)
            except ImportError as e:
                notes.append(f"{name} skipped: {type(e).__name__}: {e}")
    return found


def time_ms(fn: Callable[[], object], args: argparse.Namespace, warmup: int | None = None) -> float:
    """Milliseconds per call: triton's do_bench (CUDA events, median) on CUDA, best of --reps on CPU."""
    if args.device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    for _ in range(args.warmup if warmup is None else warmup):
        fn()
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def is_oom(e: Exception) -> bool:
    text = str(e).lower()  # CPU allocation failures are plain RuntimeErrors
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't alloc" in text


Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def inputs(n: int, args: argparse.Namespace) -> Inputs:
    """q, k, v (requiring grad) and an upstream gradient, shared by every row at length n."""
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, device=args.device, dtype=args.dtype, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(shape, device=args.device, dtype=args.dtype)


def passes(attend: Callable, layout: BlockLayout, x: Inputs, args: argparse.Namespace) -> tuple[Callable, Callable]:
    """The forward (under no_grad) and the forward + backward of one row, as calls to time."""
    q, k, v, dout = x

    def fwd() -> None:
        with torch.no_grad():
            attend(q, k, v, layout, args.block_size)

    def fwd_bwd() -> None:
        torch.autograd.grad(attend(q, k, v, layout, args.block_size), (q, k, v), dout)

    return fwd, fwd_bwd


def measure(fwd: Callable, fwd_bwd: Callable, args: argparse.Namespace) -> tuple:
    """(fwd ms, fwd+bwd ms, peak MiB of one fwd+bwd beyond q, k, v and the upstream grad), with "OOM" for what
    ran out of memory and "n/a" for a pass the backend lacks (flex's backward on CPU) or a CPU peak."""
    cuda = args.device.type == "cuda"
    fwd_ms: float | str = "n/a"
    try:
        fwd()  # compiles (flex, triton) and builds the cached tables outside the timing
        fwd_ms = time_ms(fwd, args)
        fwd_bwd()  # the same for the backward, and outside the memory count
        peak: float | str = "n/a"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return fwd_ms, time_ms(fwd_bwd, args), peak
    except NotImplementedError:
        return fwd_ms, "n/a", "n/a"
    except Exception as e:
        if not is_oom(e):
            raise
        return (fwd_ms if isinstance(fwd_ms, float) else "OOM"), "OOM", "OOM"
    finally:
        if cuda:
            torch.cuda.empty_cache()


def run(args: argparse.Namespace, notes: list[str]) -> list[Row]:
    """Every backend on every layout and length; one that ran out of memory is not retried at a larger N. On the
    CPU every row of a length is timed again in ``--passes`` passes over them all, and keeps its best: a shared
    machine's speed drifts over minutes, and this way the drift falls on every row alike."""
    attends = backends(args, notes)
    rows, out_of_memory = [], set()
    for n in args.seq_lens:
        x, timed = inputs(n, args), []
        for name, attend, kind, layout in cases(n, attends, args):
            flops = 4.0 * args.batch * layout.nnz * args.block_size**2 * args.head_dim
            times = ("OOM",) * 3
            calls = passes(attend, layout, x, args)
            if (name, kind) not in out_of_memory:
                try:
                    times = measure(*calls, args)
                except Exception as e:
                    notes.append(f"{name} {kind} N={n} failed: {type(e).__name__}: {str(e).splitlines()[0]}")
                    times = ("error",) * 3
            if times[1] == "OOM":
                out_of_memory.add((name, kind))
            rows.append(Row(name, kind, n, layout.density(), flops, *times))
            timed.append((rows[-1], calls))
            print(markdown_row(rows[-1], rows), flush=True)
        for _ in range(args.passes - 1 if args.device.type == "cpu" else 0):
            for row, (fwd, fwd_bwd) in timed:
                for field, call in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
                    if isinstance(getattr(row, field), float):
                        setattr(row, field, min(getattr(row, field), time_ms(call, args, warmup=0)))
        del x, timed
    if any(n > args.reference_max_n for n in args.seq_lens) and "reference" in args.backends:
        notes.append(f"reference skipped above N={args.reference_max_n} (--reference-max-n)")
    return rows


def fmt(x: float | str) -> str:
    """Three significant digits, never in exponent form."""
    if isinstance(x, str) or x == 0:
        return str(x)
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def speedup(row: Row, rows: list[Row], backend: str, layout: str | None) -> str:
    """Fwd+bwd time of ``backend`` at the same N (and layout) over this row's: above 1, this row is faster."""
    other = [r for r in rows if r.backend == backend and r.n == row.n and layout in (None, r.layout)]
    if other and all(isinstance(t, float) for t in (row.fwd_bwd_ms, other[0].fwd_bwd_ms)):
        return f"{other[0].fwd_bwd_ms / row.fwd_bwd_ms:.2f}"
    if other and all(isinstance(t, float) for t in (row.fwd_ms, other[0].fwd_ms)):
        return f"{other[0].fwd_ms / row.fwd_ms:.2f} (fwd)"  # flex on the CPU: no backward to compare
    return "-"


HEADER = [
    "| backend | layout | N | density | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | peak MiB | x SDPA | x flex |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def markdown_row(row: Row, rows: list[Row]) -> str:
    def tflops(flops: float, ms: float | str) -> str:
        return fmt(flops / ms / 1e9) if isinstance(ms, float) else "-"

    cells = [
        row.backend, row.layout, str(row.n), f"{row.density:.3f}", fmt(row.fwd_ms), fmt(row.fwd_bwd_ms),
        tflops(row.flops, row.fwd_ms), tflops(3.5 * row.flops, row.fwd_bwd_ms), fmt(row.peak_mib),
        speedup(row, rows, "sdpa", None), speedup(row, rows, "flex", row.layout),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def flex_notes(args: argparse.Namespace) -> list[str]:
    """Flex describes a layout of blocks under 128 with 128-wide tiles; say how much more it then computes."""
    if "flex" not in args.backends:
        return []
    from sparse_transformer.model.kernels.flex import flex_block_mask, flex_tile

    notes = []
    for n in args.seq_lens if args.device.type == "cuda" else []:  # on the CPU flex takes the layout's blocks
        tile = flex_tile(args.block_size, n)
        for kind, layout in layouts(n, args).items() if tile != args.block_size else []:
            bm = flex_block_mask(layout, args.block_size, torch.device("cpu"))
            tiles = (bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()).item()
            c = n // tile
            notes.append(f"flex {kind} N={n}: its {tile}-wide tiles cover {tiles / (args.heads * c * (c + 1) / 2):.3f} "
                         f"of the causal tiles, the layout {layout.density():.3f}")  # fmt: skip
    return notes


def report(args: argparse.Namespace, rows: list[Row], notes: list[str], started: str, load: float) -> str:
    try:
        import triton

        triton_version = triton.__version__ + (" (interpreter)" if INTERPRET else "")
    except ImportError:
        triton_version = "not installed"
    command = ("TRITON_INTERPRET=1 " if INTERPRET else "") + shlex.join(["python", *sys.argv])
    timing = (
        "median of triton.testing.do_bench (CUDA events)"
        if args.device.type == "cuda"
        else f"best of {args.passes} passes over all rows of an N, each {args.reps} time.perf_counter run(s) (the first "
        f"after {args.warmup} warmup)"
    )
    lines = [
        f"# Attention backends on {device_name(args.device)}",
        "",
        f"- command: `{command}`",
        f"- date: {started}; torch {torch.__version__}, triton {triton_version}",
        *([f"- load average at the start: {load:.2f} on {os.cpu_count()} cores: other work ran beside this run (the rows of "
           "one N are timed in turns, so it falls on them alike)"] if args.device.type == "cpu" and load > 0.5 else []),
        f"- q, k, v: [B, H, N, D] = [{args.batch}, {args.heads}, N, {args.head_dim}], {args.dtype}",
        *(f"- {kind} (at N={args.seq_lens[0]}): {pattern(kind, args.seq_lens[0], args)}" for kind in args.layouts if kind != "dense"),
        f"- head modes: {', '.join(args.head_modes)} (a layout named kind-mode; -L1: the rule of odd layers)",
        f"- sdpa: dense causal scaled_dot_product_attention, the baseline; reference only up to N={args.reference_max_n}",
        "",
        *HEADER,
        *(markdown_row(r, rows) for r in rows),
        "",
        f"density: the fraction of the causal tiles the layout computes. Times: {timing}; fwd under no_grad. "
        "TFLOP/s: 4·B·tiles·bs²·D for the forward, counted on the layout's tiles (diagonal tiles in full; sdpa on "
        "the causal tiles), 2.5 times that for the backward. peak MiB: CUDA memory allocated during one fwd+bwd "
        "beyond q, k, v and the upstream gradient (n/a on CPU, where bench/memory.py measures it). x SDPA, x flex: their fwd+bwd time over this row's "
        "at the same N (and layout), forward only where flex has no backward (the CPU); above 1 this row is faster. "
        "OOM: out of memory; n/a: not available.",
    ]
    if notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), os.getloadavg()[0]
    torch.manual_seed(0)
    notes: list[str] = []
    print("\n".join(HEADER), flush=True)
    rows = run(args, notes)
    text = report(args, rows, notes + flex_notes(args), started, load)
    if args.device.type == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(args.device).lower()).strip("-")
    else:
        slug = "cpu-interpret" if INTERPRET else "cpu"
    out = args.out or Path(__file__).resolve().parent / "results" / f"attention-{slug}.md"
    plot = plots.attention_times(rows, out.with_suffix(".png"), f"{device_name(args.device)}, {args.dtype}, B={args.batch} H={args.heads} D={args.head_dim}, block {args.block_size}")
    write_atomic(out, text + f"\n{plot}\n")
    print(f"\n{text}\n{plot}\nwritten to {out}")


if __name__ == "__main__":
    main()
