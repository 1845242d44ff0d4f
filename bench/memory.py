"""Peak memory of one attention forward + backward on the CPU, per backend, layout and N: does it grow like N?

    python bench/memory.py --seq-lens 2048 4096 8192 16384 --stride sqrt

On CUDA, bench/attention.py measures this with the allocator's counter. The CPU has none, so this reads the
process's peak resident set around one call (Linux: VmHWM in /proc/self/status, reset through
/proc/self/clear_refs), with glibc told to map every allocation above 128 KiB fresh and unmap it when freed
(mallopt), so memory freed earlier is not reused unseen. That setting slows large allocations, so nothing is
timed here. Layouts, patterns and backends are bench/attention.py's.

The call measured is a layout's first, with the backends' per-layout caches empty (``lut.per_layout``: plans,
tables, masks), so what a backend builds and keeps for a layout is in its peak; a second table gives what the
caches still hold after it (``lut.cache_bytes``). The process runs every backend once at a small N first, so
one-time costs of the process (thread pools, BLAS buffers) are not charged to the first row.
"""

from __future__ import annotations

import argparse
import gc
import math
import shlex
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.attention import DTYPES, backends, cases, inputs, passes  # noqa: E402
from bench.machine import device_name  # noqa: E402
from bench.rss import current_rss, peak_rss, reset_peak  # noqa: E402
from sparse_transformer import allocator  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.model.kernels import lut  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--backends", nargs="+", choices=("sdpa", "cpp", "pieces", "blocks", "reference"),
                   default=["sdpa", "cpp", "pieces", "blocks", "reference"])  # fmt: skip
    p.add_argument("--layouts", nargs="+", choices=("strided", "fixed", "local"), default=["strided", "fixed", "local"])
    p.add_argument("--head-modes", nargs="+", choices=("interleaved", "merged", "split"), default=["merged"])
    p.add_argument("--stride", default="sqrt", help="l of strided and fixed: an int, or sqrt for l ~ sqrt(N)")
    p.add_argument("--summary", type=int, default=32)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--reference-max-n", type=int, default=8192, help="skip the O(N^2) reference above this N")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "memory-cpu.md")
    args = p.parse_args()
    args.device, args.dtype = torch.device("cpu"), DTYPES[args.dtype]
    return args


def peak_mib(fwd_bwd: Callable[[], None]) -> tuple[float, float]:
    """(peak resident MiB of one forward + backward above what was resident before it, MiB the per-layout caches
    hold after it), the caches emptied first, so building them is in the peak."""
    lut.clear_caches()
    gc.collect()
    reset_peak()
    before = current_rss()
    fwd_bwd()
    return (peak_rss() - before) / 2**20, lut.cache_bytes() / 2**20


def main() -> None:
    args = parse_args()
    if not Path("/proc/self/clear_refs").exists() or not allocator.map_above(128 << 10):
        sys.exit("error: bench/memory.py needs Linux with glibc (/proc/self/clear_refs, mallopt)")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    torch.manual_seed(0)
    notes: list[str] = []
    attends = backends(args, notes)
    small = argparse.Namespace(**{**vars(args), "seq_lens": [4 * args.block_size]})
    for _, attend, _, layout in cases(small.seq_lens[0], attends, small):  # the process's one-time costs
        passes(attend, layout, inputs(small.seq_lens[0], small), small)[1]()
    peaks: dict[tuple[str, str], dict[int, float]] = {}
    held: dict[tuple[str, str], dict[int, float]] = {}
    for n in args.seq_lens:
        x = inputs(n, args)
        for name, attend, kind, layout in cases(n, attends, args):
            peaks.setdefault((name, kind), {})[n], held.setdefault((name, kind), {})[n] = peak_mib(passes(attend, layout, x, args)[1])
            print(f"{name:9} {kind:24} N={n:6}  {peaks[name, kind][n]:9.1f} MiB, caches {held[name, kind][n]:7.2f} MiB", flush=True)
        del x
    columns = " | ".join(f"N={n}" for n in args.seq_lens)
    rule = "|---|---|" + "---:|" * (len(args.seq_lens) + 1)
    lines = [
        f"# Peak memory of attention forward + backward on {device_name(args.device)}",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date: {started}; torch {torch.__version__}",
        f"- q, k, v: [B, H, N, D] = [{args.batch}, {args.heads}, N, {args.head_dim}], {args.dtype}; block "
        f"{args.block_size}, stride {args.stride}, head modes {', '.join(args.head_modes)}",
        *(f"- {note}" for note in notes),
        "",
        "Peak MiB of a layout's first forward + backward, the per-layout caches built in it:",
        "",
        f"| backend | layout | {columns} | × per doubling of N |",
        rule,
        *(table_row(key, by_n, args.seq_lens, "{:.1f}", growth=True) for key, by_n in peaks.items()),
        "",
        "MiB the per-layout caches hold after it (plans, lookup tables, masks), for as long as a layout with that "
        "content is alive:",
        "",
        f"| backend | layout | {columns} | × per doubling of N |",
        rule,
        *(table_row(key, by_n, args.seq_lens, "{:.2f}", growth=True) for key, by_n in held.items()),
        "",
        "MiB: the peak resident set during one forward + backward above the resident set before it: activations, "
        "saved tensors, gathered copies, workspaces, what the caches build, and the gradients dq, dk, dv (3·B·H·N·D "
        "elements). × per doubling of N: (last / first) ^ (1 / doublings); 2 is linear in N, 4 quadratic. sdpa: "
        "dense causal scaled_dot_product_attention (flash: linear); reference: dense masked attention (an N×N "
        "matrix per head).",
    ]
    write_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwritten to {args.out}")


def table_row(key: tuple[str, str], by_n: dict[int, float], seq_lens: list[int], form: str, growth: bool) -> str:
    ns = sorted(by_n)
    rate = None
    if growth and len(ns) > 1 and by_n[ns[0]] > 0:
        rate = (by_n[ns[-1]] / by_n[ns[0]]) ** (1 / math.log2(ns[-1] / ns[0]))
    cells = [form.format(by_n[n]) if n in by_n else "-" for n in seq_lens]
    return f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {'-' if rate is None else f'{rate:.2f}'} |"


if __name__ == "__main__":
    main()
