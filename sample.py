"""Generate from a checkpoint: ``python sample.py --ckpt runs/quickstart/.../last.ckpt``.

The checkpoint carries the model's configuration and its modality, so nothing else is needed: text
models write ``sample_<i>.txt`` (or print), image models a PNG grid, audio models ``sample_<i>.wav``.
``--complete N`` (images) primes with the top half of N validation images from the DataModule the
checkpoint recorded and writes corrupted / completed / original side by side. Same seed, same output.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import lightning as L
import torch

from sparse_transformer.errors import InputError, run_cli
from sparse_transformer.kernels import BACKENDS
from sparse_transformer.lightning_module import SparseTransformerLM
from sparse_transformer.atomic import write_atomic
from sparse_transformer.modality import bytes_to_images, png_bytes, samples_to_files
from sparse_transformer.sampling import generate, sample_modality


def load_model(ckpt: str, device: str, backend: str | None = None) -> SparseTransformerLM:
    if not Path(ckpt).is_file():
        raise InputError(f"checkpoint {ckpt} not found")
    try:
        module = SparseTransformerLM.load_from_checkpoint(ckpt, map_location=device, **({"backend": backend} if backend else {}))
    except RuntimeError as e:  # the weights do not fit the configuration the checkpoint records
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))[:300]
        raise InputError(f"checkpoint {ckpt} does not match the model it describes ({detail})") from e
    except Exception as e:  # pickle, zip and key errors all mean the same thing to a user
        raise InputError(f"checkpoint {ckpt} is not a readable Sparse Transformer checkpoint ({type(e).__name__})") from e
    return module.eval()


def load_datamodule(ckpt: str, root: str | None) -> L.LightningDataModule:
    """Rebuild the DataModule a checkpoint was trained with, from the hyperparameters Lightning saved."""
    hparams = dict(torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True).get("datamodule_hyper_parameters") or {})
    class_path = hparams.get("_class_path")
    if not class_path:
        raise InputError(f"checkpoint {ckpt} does not record its DataModule (train it with train.py)")
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if root is not None:
        kwargs["root"] = root
    return cls(**kwargs)


def complete_images(
    module: SparseTransformerLM, datamodule: L.LightningDataModule, n: int, temperature: float, top_k: int | None, generator
) -> tuple[torch.Tensor, bytes]:
    """Prime with the top half of ``n`` validation images, generate the rest; a grid of corrupted / completed / original."""
    rows, cols, channels = module.modality["shape"]
    datamodule.setup("validate")
    if n > len(datamodule.val):
        raise InputError(f"--complete {n} asks for more images than the validation split holds ({len(datamodule.val)})")
    original = torch.stack([datamodule.val[i] for i in range(n)]).to(module.device)  # (n, 1 + N)
    primed = 1 + (rows // 2) * cols * channels  # start token + the top rows
    completed = generate(module.model, original[:, :primed], original.shape[1] - primed, temperature, top_k, generator)
    corrupted = original.clone()
    corrupted[:, primed:] = 128  # the part the model did not see, in mid grey
    triples = torch.stack([corrupted, completed, original], dim=1)[:, :, 1:].flatten(0, 1)  # (3n, N)
    return completed[:, 1:], png_bytes(bytes_to_images(triples, module.modality["shape"]), nrow=3)


def main(argv: list[str] | None = None) -> list[bytes]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train.py")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: fill the model's context)")
    p.add_argument("--prompt", default=None, help="text to continue (text models; default: a newline)")
    p.add_argument("--complete", type=int, default=None, metavar="N", help="image completion of N validation images")
    p.add_argument("--data-root", default=None, help="where the validation data is, if not where training read it")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder; text is printed without it, other media go to samples/")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="attention backend (default: the checkpoint's)")
    p.add_argument("--no-kv-cache", action="store_true", help="re-run the whole prefix every step (slow; for checking)")
    args = p.parse_args(argv)

    if args.num_samples < 1 or (args.length is not None and args.length < 1):
        raise InputError(f"--num-samples={args.num_samples} and --length={args.length} must be >= 1")
    module = load_model(args.ckpt, args.device, args.backend)
    modality, seq_len = module.modality, module.hparams.seq_len
    kind = modality["kind"]
    generator = torch.Generator().manual_seed(args.seed)
    out = Path(args.out) if args.out else (None if kind == "text" else Path("samples"))

    if args.complete is not None:
        if kind != "image" or args.complete < 1:
            raise InputError(f"--complete {args.complete} needs an image checkpoint (this one is {kind}) and N >= 1")
        datamodule = load_datamodule(args.ckpt, args.data_root)
        tokens, grid = complete_images(module, datamodule, args.complete, args.temperature, args.top_k, generator)
        write_atomic(out / "completions.png", grid)
        print(f"wrote {out / 'completions.png'} (each row: corrupted, completed, original)")
        return [bytes(row.tolist()) for row in tokens]

    if kind == "text":
        prompt = (args.prompt if args.prompt is not None else "\n").encode("utf-8")
        if not prompt:
            raise InputError("--prompt is empty; give at least one character (the default is a newline)")
        length = args.length or seq_len + 1 - len(prompt)
    else:
        if args.prompt is not None:
            raise InputError(f"--prompt is for text models; this checkpoint models {kind}")
        length = args.length or seq_len
        if length > seq_len or (kind == "image" and length != seq_len):
            raise InputError(f"--length={length}: a {kind} sample has {seq_len} tokens (the model's context)")
        prompt = b""
    sampling = (args.temperature, args.top_k, generator, prompt, not args.no_kv_cache)
    tokens = sample_modality(module.model, modality, args.num_samples, length, *sampling)
    samples = [bytes(row.tolist()) for row in tokens]
    if out is None:
        for i, sample in enumerate(samples):
            print(f"--- sample {i} ---\n{sample.decode('utf-8', errors='replace')}")
        return samples
    for name, data in samples_to_files(tokens, modality).items():
        write_atomic(out / name, data)
    print(f"wrote {len(samples)} samples to {out}")
    return samples


if __name__ == "__main__":
    run_cli(main)
