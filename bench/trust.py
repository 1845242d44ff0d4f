"""What the run's checks cost: the data fingerprint of a file, the finiteness check and the seal of every save,
and the seal's verification on resume, each against what it guards, in one run.

    python bench/trust.py                         # a 100 MB file; the quickstart model and a 101M-parameter one
    python bench/trust.py --file-mb 10 --models quickstart

- fingerprint: ``ByteTextDataModule.fingerprint`` (SHA-256 of the whole file) on a file of random bytes, after
  one read to warm the page cache (a second start finds it warm; a cold read adds the disk's time), against
  the first-and-last-MiB hash it replaced.
- per save: ``finite.first_non_finite`` over the weights and AdamW's two moments (what AtomicCheckpointIO
  checks before every save: a sum per tensor), the seal (SHA-256 of the serialized checkpoint), and the whole save it is part of
  (``AtomicCheckpointIO.save_checkpoint``: serialize, check, seal, write, fsync, rename).
- on resume: ``checkpoint_io.verify`` (reads the file, SHA-256) against ``torch.load`` of the same file.

Times are the best of ``--repeats``. The table and the command are written to bench/results/trust-cpu.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.machine import cpu_name  # noqa: E402
from sparse_transformer.data.text import ByteTextDataModule  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.model import AttentionPattern, ModelConfig, SparseTransformer  # noqa: E402
from sparse_transformer.training import checkpoint_io  # noqa: E402
from sparse_transformer.training.finite import first_non_finite, tensors_of  # noqa: E402

MODELS = {  # name -> (d_model, n_layers, n_heads)
    "quickstart": (256, 4, 4),
    "101M": (768, 14, 12),
}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def head_and_tail(path: Path) -> str:
    """The fingerprint before: a hash of the first and last MiB."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(1 << 20)
        f.seek(max(size - (1 << 20), 0))
        return hashlib.sha256(head + f.read()).hexdigest()


def fingerprint_rows(folder: Path, megabytes: int, repeats: int) -> list[str]:
    path = folder / "data.bin"
    with path.open("wb") as f:
        for _ in range(megabytes):
            f.write(os.urandom(1 << 20))
    data = ByteTextDataModule(path=str(path), seq_len=256)
    path.read_bytes()  # warm the page cache
    whole, ends = best(data.fingerprint, repeats), best(lambda: head_and_tail(path), repeats)
    return [f"| whole-file SHA-256 (now) | {megabytes} MB | {whole * 1000:,.0f} |", f"| first and last MiB (before) | {megabytes} MB | {ends * 1000:,.1f} |"]


def checkpoint_of(name: str) -> dict:
    """A checkpoint as Lightning makes one: weights and the state of AdamW after one step."""
    d, layers, heads = MODELS[name]
    config = ModelConfig(d_model=d, n_layers=layers, n_heads=heads, seq_len=256, pattern=AttentionPattern("dense", block_size=64))
    model = SparseTransformer(config)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 1}


def save_rows(folder: Path, name: str, repeats: int) -> list[str]:
    checkpoint = checkpoint_of(name)
    params = sum(t.numel() for t in checkpoint["state_dict"].values())
    trained = {k: checkpoint[k] for k in ("state_dict", "optimizer_states")}
    finite = best(lambda: first_non_finite(tensors_of(trained)), repeats)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    size = buffer.tell()
    seal = best(lambda: hashlib.sha256(buffer.getbuffer()).hexdigest(), repeats)
    path = folder / f"{name}.ckpt"
    save = best(lambda: checkpoint_io.AtomicCheckpointIO().save_checkpoint(checkpoint, path), repeats)

    def verify() -> None:
        checkpoint_io._verify.cache_clear()
        checkpoint_io.verify(path)

    check = best(verify, repeats)
    load = best(lambda: torch.load(path, weights_only=False), repeats)
    return [
        f"| {name} | {params / 1e6:,.1f}M | {size / 2**20:,.0f} | {finite * 1000:,.1f} | {seal * 1000:,.1f} | {save * 1000:,.0f} | "
        f"{(finite + seal) / save:.1%} | {check * 1000:,.0f} | {load * 1000:,.0f} |"
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file-mb", type=int, default=100, help="size of the data file to fingerprint")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trust-cpu.md")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fingerprint = fingerprint_rows(folder, args.file_mb, args.repeats)
        saves = [row for name in args.models for row in save_rows(folder, name, args.repeats)]
    command = " ".join(["python", "bench/trust.py", *map(shlex.quote, sys.argv[1:])])
    text = "\n".join([
        f"# What the checks cost, on CPU, {torch.get_num_threads()} thread(s)",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; {cpu_name()}",
        f"- best of {args.repeats}; the data file warm in the page cache",
        "",
        "## Data fingerprint, once per start",
        "",
        "| fingerprint | file | ms |",
        "|---|---:|---:|",
        *fingerprint,
        "",
        "## Every save, and every resume",
        "",
        "Finite: the sums over weights and AdamW's moments that find a NaN or an infinity; seal: SHA-256 of the",
        "serialized checkpoint; save: all of `AtomicCheckpointIO.save_checkpoint` (serialize, finite, seal, write,",
        "fsync, rename); verify: the seal checked on resume or in sample.py, against `torch.load` of the same file.",
        "",
        "| model | parameters | checkpoint MiB | finite ms | seal ms | save ms | finite + seal / save | verify ms | torch.load ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *saves,
        "",
    ])  # fmt: skip
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
