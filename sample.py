"""Generate bytes from a checkpoint: ``python sample.py --ckpt runs/quickstart/.../last.ckpt``.

The checkpoint carries the model's configuration, so nothing else is needed. Same seed, same output.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from sparse_transformer.errors import InputError, run_cli
from sparse_transformer.kernels import BACKENDS
from sparse_transformer.lightning_module import SparseTransformerLM
from sparse_transformer.sampling import generate


def load_model(ckpt: str, device: str, backend: str | None = None) -> SparseTransformerLM:
    if not Path(ckpt).is_file():
        raise InputError(f"checkpoint {ckpt} not found")
    try:
        module = SparseTransformerLM.load_from_checkpoint(
            ckpt, map_location=device, **({"backend": backend} if backend else {})
        )
    except Exception as e:  # pickle, zip and key errors all mean the same thing to a user
        raise InputError(f"checkpoint {ckpt} is not a readable Sparse Transformer checkpoint ({type(e).__name__})") from e
    return module.eval()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> list[bytes]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train.py")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--length", type=int, default=500, help="bytes to generate per sample")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for sample_<i>.txt; printed to stdout otherwise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="attention backend (default: the checkpoint's)")
    args = p.parse_args(argv)

    prompt_bytes = args.prompt.encode("utf-8")
    if not prompt_bytes:
        raise InputError("--prompt is empty; give at least one character (the default is a newline)")
    if args.num_samples < 1 or args.length < 1:
        raise InputError(f"--num-samples={args.num_samples} and --length={args.length} must be >= 1")
    module = load_model(args.ckpt, args.device, args.backend)
    prompt = torch.tensor(list(prompt_bytes), device=args.device).repeat(args.num_samples, 1)  # (S, T)
    generator = torch.Generator().manual_seed(args.seed)
    tokens = generate(module.model, prompt, args.length, args.temperature, args.top_k, generator)
    samples = [bytes(row.tolist()) for row in tokens]
    for i, sample in enumerate(samples):
        if args.out:
            write_atomic(Path(args.out) / f"sample_{i}.txt", sample)
        else:
            print(f"--- sample {i} ---\n{sample.decode('utf-8', errors='replace')}")
    if args.out:
        print(f"wrote {len(samples)} samples to {args.out}")
    return samples


if __name__ == "__main__":
    run_cli(main)
