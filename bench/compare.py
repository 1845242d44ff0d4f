"""Compare model variants: train each on the same data, seed and step budget; tabulate bits/byte, speed, memory.

    python bench/compare.py --config configs/compare/tiny.yaml
    python bench/compare.py --config configs/compare/tiny.yaml --variants dense performer --out /tmp/cmp.md

A compare config is made of ``train.py`` configs, composed as ``train.py --config a.yaml --config b.yaml``
composes them: ``configs`` every variant starts from (the base and the budget), then ``variants``, each the
overlays on top. An overlay is a config file's path or the same YAML written inline::

    configs: [configs/tiny.yaml, {trainer: {max_steps: 400}}]
    variants:
      strided: []
      performer: [configs/variants/performer.yaml]
      fixed: [{model: {network: {pattern: {kind: fixed, summary: 8}}}}]

Every variant runs through the real LightningCLI in a fresh process (same seed, same data), so its peak memory
is its own; after training it is validated once more on the final weights. The table is printed and written as
Markdown, with the command that made it, to ``out`` (default bench/results/compare-<config>-<device>.md).
Checkpoints stay under ``root``/<variant> for sample.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py and the package live at the repository root

import train  # noqa: E402
from bench import plots  # noqa: E402
from bench.machine import device_name  # noqa: E402
from bench.rss import current_rss, peak_rss, reset_peak  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.errors import InputError, run_cli  # noqa: E402

CONFIG_KEYS = {"configs", "variants", "out", "root"}
Overlay = str | dict[str, Any]  # a train.py config file, or the same YAML inline


def load_config(path: Path) -> dict[str, Any]:
    """The compare config, checked: every problem is one line naming the key and the file."""
    if not path.is_file():
        raise InputError(f"compare config {path} not found")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict) or not config.keys() <= CONFIG_KEYS:
        extra = sorted(set(config) - CONFIG_KEYS) if isinstance(config, dict) else config
        raise InputError(f"compare config {path}: unknown keys {extra}; allowed: {', '.join(sorted(CONFIG_KEYS))}")
    variants = config.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise InputError(f"compare config {path}: 'variants' must map names to lists of overlays")
    for name, overlays in [("configs", config.get("configs")), *variants.items()]:
        if not isinstance(overlays, list) or not all(isinstance(o, (str, dict)) for o in overlays):
            raise InputError(f"compare config {path}: {name!r} must be a list of train.py configs (paths or inline YAML)")
        missing = [o for o in overlays if isinstance(o, str) and not Path(o).is_file()]
        if missing:
            raise InputError(f"compare config {path}: {name!r} names {missing[0]!r}, which is not a file")
    if not config["configs"]:
        raise InputError(f"compare config {path}: 'configs' must name at least the base train.py config")
    return config


def config_args(overlays: list[Overlay], folder: Path) -> list[str]:
    """``--config`` arguments for ``overlays``; inline ones are written to files in ``folder`` first."""
    args = []
    for i, overlay in enumerate(overlays):
        if isinstance(overlay, dict):
            path = folder / f"overlay-{i}.yaml"
            path.write_text(yaml.safe_dump(overlay))
            overlay = str(path)
        args += ["--config", overlay]
    return args


class Meter(L.Callback):
    """Training tokens/s over the timed steps (data loading and validation excluded), peak memory, and the
    validation curve: bits at each validation against the training tokens and training seconds before it."""

    def __init__(self, warmup_steps: int = 1):
        self.warmup_steps, self.steps, self.tokens, self.seconds = warmup_steps, 0, 0, 0.0
        self.all_tokens, self.all_seconds, self.curve = 0, 0.0, []

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_start(self, trainer, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)
        else:
            reset_peak()  # each variant's own peak: they train one after another in this process
        self.rss_start = current_rss()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(module)
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync(module)
        self.steps += 1
        seconds, tokens = time.perf_counter() - self.started, batch[:, 1:].numel()
        self.all_seconds, self.all_tokens = self.all_seconds + seconds, self.all_tokens + tokens
        if self.steps > self.warmup_steps:  # the first step pays for allocation and kernel compilation
            self.seconds += seconds
            self.tokens += tokens

    def on_validation_end(self, trainer, module) -> None:
        metric = trainer.callback_metrics.get(f"val_{module.unit}")
        if not trainer.sanity_checking and metric is not None and self.all_tokens:
            point = {"step": trainer.global_step, "tokens": self.all_tokens, "seconds": self.all_seconds, "bits": float(metric)}
            if not self.curve or self.curve[-1]["step"] != point["step"]:
                self.curve.append(point)

    def on_train_end(self, trainer, module) -> None:
        if module.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(module.device) / 2**20
        else:  # the high-water mark above the resident size when training began
            self.peak_mib = max(peak_rss() - self.rss_start, 0) / 2**20


def run_variant(config: dict[str, Any], name: str, root: Path) -> dict[str, Any]:
    """Train and validate one variant in this process; returns its row."""
    shutil.rmtree(root / name, ignore_errors=True)  # a rerun replaces the variant's run folder
    (root / name).mkdir(parents=True)
    args = config_args([*config["configs"], *config["variants"][name]], root / name)
    cli = train.main([*args, "--trainer.default_root_dir", str(root / name)], run=False)
    meter = Meter()
    cli.trainer.callbacks.append(meter)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - started
    (metrics,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    final = {"step": cli.trainer.global_step, "tokens": meter.all_tokens, "seconds": meter.all_seconds}
    if not meter.curve or meter.curve[-1]["step"] != final["step"]:
        meter.curve.append({**final, "bits": metrics[f"val_{cli.model.unit}"]})
    return {
        "variant": name,
        "overlays": config["variants"][name],
        "params": cli.model.model.num_params(),
        "val_bpb": metrics["val_bpb"],
        "tokens_per_s": meter.tokens / meter.seconds if meter.seconds else float("nan"),
        "peak_mib": meter.peak_mib,
        "steps": cli.trainer.global_step,
        "wall_s": wall,
        "device": str(cli.model.device),
        "curve": meter.curve,
    }


def run_in_subprocess(config_path: Path, name: str, root: Path) -> dict[str, Any]:
    """One variant in a fresh interpreter, so memory peaks and seeds do not leak between variants."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--config", str(config_path), "--variant", name, "--result", str(result)]
        command += ["--root", str(root)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            if errors:
                raise InputError(f"variant {name!r}: {errors[-1].removeprefix('error: ')}")
            raise RuntimeError(f"variant {name!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(result.read_text())


def overlays_text(overlays: list[Overlay]) -> str:
    """How a table names a variant's overlays: a file by its path, inline YAML as dotted options."""
    return "; ".join(o if isinstance(o, str) else ", ".join(f"{k}={v}" for k, v in dotted(o).items()) for o in overlays) or "(base)"


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{model: {network: {d_model: 64}}}`` -> ``{"d_model": 64}``: the leaves, without the model/network/init_args levels."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}." if key not in ("model", "network", "init_args", "data") else prefix
        out.update(dotted(value, name) if isinstance(value, dict) else {name.removesuffix("."): value})
    return out


def report(rows: list[dict[str, Any]], config: dict[str, Any], config_path: Path, command: str, started: str) -> str:
    cuda = rows[0]["device"].startswith("cuda")
    where = device_name(torch.device(rows[0]["device"]))
    memory = "peak CUDA MiB allocated" if cuda else "peak RSS growth MiB"
    lines = [
        f"# Variant comparison: {config_path.name} on {where}",
        "",
        f"- command: `{command}`",
        f"- date: {started}; torch {torch.__version__}, lightning {L.__version__}",
        f"- every variant starts from: {overlays_text(config['configs'])}",
        "- every variant: same seed and data, its training steps in the table, each in its own process",
        "",
        f"| variant | overlays | params | val bits/byte | train tokens/s | x {rows[0]['variant']} | {memory} | wall s | steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {overlays_text(r['overlays'])} | {r['params']:,} | {r['val_bpb']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f} | {r['peak_mib']:.1f} | "
            f"{r['wall_s']:.1f} | {r['steps']} |"
        )
    lines += [
        "",
        "val bits/byte: one validation pass over the final weights (`trainer.limit_val_batches` batches). "
        "train tokens/s: tokens of the timed training steps over their time (forward, backward, optimizer; "
        f"data loading, validation and the first step excluded); x {rows[0]['variant']}: its ratio to the first "
        "variant's. "
        + (
            "peak CUDA MiB allocated: torch.cuda.max_memory_allocated over training. "
            if cuda
            else "peak RSS growth MiB: the process's resident-memory high-water mark above its size when training "
            "began (allocator caching included; a coarse CPU stand-in for activation memory). "
        )
        + "wall s: the whole fit, validation and checkpointing included.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True, help="compare config: configs, variants")
    p.add_argument("--variants", nargs="+", help="run only these variants (default: all, in config order)")
    p.add_argument("--out", type=Path, help="Markdown table (default: the config's out, else bench/results/...)")
    p.add_argument("--root", type=Path, help="run folders, one per variant (default: runs/compare/<config>)")
    p.add_argument("--variant", help="run this one variant here and write its row to --result (used per process)")
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    config = load_config(args.config)
    root = args.root or Path(config.get("root") or f"runs/compare/{args.config.stem}")
    names = [args.variant] if args.variant else args.variants or list(config["variants"])
    unknown = [n for n in names if n not in config["variants"]]
    if unknown:
        raise InputError(f"variants {unknown} are not in {args.config}: {', '.join(config['variants'])}")

    if args.variant:
        row = run_variant(config, args.variant, root)
        if args.result:
            write_atomic(args.result, json.dumps(row))
        print(json.dumps(row))
        return [row]

    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "bench/compare.py", *(argv if argv is not None else sys.argv[1:])])
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: {overlays_text(config['variants'][name])}", flush=True)
        rows.append(run_in_subprocess(args.config, name, root))
        r = rows[-1]
        print(f"    {r['val_bpb']:.3f} bits/byte, {r['tokens_per_s']:,.0f} tokens/s, {r['wall_s']:.0f} s", flush=True)
    text = report(rows, config, args.config, command, started)
    device = "cuda" if rows[0]["device"].startswith("cuda") else "cpu"
    out = args.out or Path(config.get("out") or ROOT / "bench" / "results" / f"compare-{args.config.stem}-{device}.md")
    curves = {r["variant"]: r["curve"] for r in rows}
    title = f"{args.config.name}: same data and seed, {device_name(torch.device(rows[0]['device']))}"
    text += "\n" + plots.training_curves(curves, out.with_suffix(".png"), title) + "\n"
    write_atomic(out, text)
    print(f"\n{text}\nwritten to {out}")
    return rows


if __name__ == "__main__":
    run_cli(main)
