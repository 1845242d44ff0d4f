"""Pictures of the benchmarks: matplotlib, an optional dependency of the benches (``pip install -e '.[bench]'``).

Each function writes one PNG atomically and returns a line for the results file, or says why it wrote none.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from sparse_transformer.files import write_atomic


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no screen: files only
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())


def attention_times(rows: list, path: Path, title: str) -> str:
    """Log-log time against N, one panel per layout, one line per backend (dense SDPA in every panel)."""
    plt = _pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    layouts = list(dict.fromkeys(r.layout for r in rows if r.backend != "sdpa"))
    if not layouts:
        return "no plot: no sparse layout ran"
    cols = min(3, len(layouts))
    rows_of_panels = math.ceil(len(layouts) / cols)
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(5 * cols, 4 * rows_of_panels), squeeze=False, layout="constrained")
    for ax, layout in zip(axes.flat, layouts):
        for backend in dict.fromkeys(r.backend for r in rows):
            mine = [r for r in rows if r.backend == backend and r.layout in (layout, "causal")]
            both = [(r.n, r.fwd_bwd_ms) for r in mine if isinstance(r.fwd_bwd_ms, float)]
            fwd = [(r.n, r.fwd_ms) for r in mine if isinstance(r.fwd_ms, float) and not isinstance(r.fwd_bwd_ms, float)]
            if both:
                label = "sdpa (dense causal)" if backend == "sdpa" else backend
                ax.plot(*zip(*both), marker="o", label=f"{label}, fwd+bwd")
            if fwd:
                ax.plot(*zip(*fwd), marker="s", linestyle="--", label=f"{backend}, fwd only")
        ax.set_yscale("log")
        ax.set_title(layout)
        _axes(ax, "sequence length N", "time per call (ms)")
    for ax in list(axes.flat)[len(layouts) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)
    return f"plot: `{path.name}` (log-log time against N per backend, one panel per layout)"


def training_curves(curves: dict[str, list[dict]], path: Path, title: str) -> str:
    """Validation bits against wall-clock seconds and against training tokens, one line per variant.

    ``curves``: variant -> points ``{"seconds", "tokens", "bits"}``, in training order.
    """
    plt = _pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for name, points in curves.items():
        if points:
            by_time.plot([p["seconds"] for p in points], [p["bits"] for p in points], marker="o", label=name)
            by_tokens.plot([p["tokens"] for p in points], [p["bits"] for p in points], marker="o", label=name)
    by_time.set_xlabel("wall-clock time of training (s)")
    by_tokens.set_xlabel("training tokens seen")
    for ax in (by_time, by_tokens):
        ax.set_ylabel("validation bits per byte")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)
    return f"plot: `{path.name}` (validation bits/byte against wall-clock time and against tokens seen)"


def peers(summary: dict[str, dict[int, dict]], path: Path, title: str) -> str:
    """Tokens/s, peak memory above imports and held-out bits/byte against N, one line per model.

    ``summary``: side (``peer``, ``plain``, ``ours``, ``dense``) -> N -> a row of bench/peers.py (the plain
    script's has no bits).
    """
    plt = _pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    labels = {
        "peer": "x-transformers (dense, flash SDPA)",
        "plain": "x-transformers, plain script",
        "ours": "ours (sparse)",
        "dense": "ours (dense pattern)",
    }
    panels = (("tokens_per_s", "training tokens/s"), ("growth_mib", "working memory (MiB)"), ("bits", "held-out bits/byte"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    for ax, (key, label) in zip(axes, panels):
        for side, rows in summary.items():
            ns = [n for n in sorted(rows) if rows[n][key] is not None]
            if ns:
                ax.plot(ns, [rows[n][key] for n in ns], marker="o", label=labels.get(side, side))
        _axes(ax, "context N", label)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)
    return f"plot: `{path.name}` (tokens/s, memory and bits/byte against N, ours and the peer)"


def long_sequences(rows: list[dict], path: Path, title: str) -> str:
    """Time and working memory per token against N, log-log, one line per side (``bench/long.py``'s rows)."""
    plt = _pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    from bench.long import LABELS

    fig, (by_time, by_memory) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for side in dict.fromkeys(r["side"] for r in rows):
        mine = sorted((r for r in rows if r["side"] == side), key=lambda r: r["n"])
        ns = [r["n"] for r in mine]
        by_time.plot(ns, [1e6 * r["step_s"] / r["n"] for r in mine], marker="o", label=LABELS[side])
        by_memory.plot(ns, [r["working"] / r["n"] / 1024 for r in mine], marker="o", label=LABELS[side])
    for ax, label in ((by_time, "training step time per token (µs)"), (by_memory, "working memory per token (KiB)")):
        ax.set_yscale("log")
        _axes(ax, "sequence length N", label)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)
    return f"plot: `{path.name}` (log-log time and working memory per token against N, one line per side)"


def _axes(ax, xlabel: str, ylabel: str) -> None:
    """N on a log2 axis, the labels, a grid and the legend: every plot against N."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
