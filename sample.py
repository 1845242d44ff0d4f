"""Generate from a checkpoint: ``python sample.py --ckpt runs/quickstart/checkpoints/last.ckpt``.

The checkpoint carries the model's configuration and its modality, so nothing else is needed: text
models write ``sample_<i>.txt`` (or print), image models a PNG grid, audio models ``sample_<i>.wav``.
``--complete N`` (images) primes with the top half of N validation images from the DataModule the
checkpoint recorded and writes corrupted / completed / original side by side. Same seed, same output.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from pathlib import Path

import lightning as L
import torch

from sparse_transformer.errors import InputError, run_cli
from sparse_transformer.files import write_atomic
from sparse_transformer.model.kernels import BACKENDS
from sparse_transformer.sampling import check_sampling, sample
from sparse_transformer.training.lightning_module import SparseTransformerLM
from sparse_transformer.training.resume import read_checkpoint


def load_model(ckpt: str, device: str, backend: str | None = None) -> SparseTransformerLM:
    check_device(device, backend)
    saved = read_checkpoint(ckpt)
    network = saved.get("hyper_parameters", {}).get("network") if isinstance(saved, dict) else None
    if network is None or "state_dict" not in saved:
        raise InputError(f"checkpoint {ckpt} is not a Sparse Transformer checkpoint (no model options or weights); train one with train.py")
    overrides = {}
    if backend:
        is_config = dataclasses.is_dataclass(network)
        overrides["network"] = dataclasses.replace(network, backend=backend) if is_config else {**network, "backend": backend}
    try:
        module = SparseTransformerLM.load_from_checkpoint(ckpt, map_location=device, **overrides)
    except RuntimeError as e:  # the weights do not fit the configuration the checkpoint records
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))[:300]
        raise InputError(f"checkpoint {ckpt} does not match the model it describes ({detail})") from e
    return module.eval()


def check_device(device: str, backend: str | None) -> None:
    """Refuse a device this machine lacks, and the Triton backend without CUDA (or its interpreter)."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise InputError(f"--device {device} is not a device; use cpu, cuda or cuda:<index>") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device here; use --device cpu")
    if backend == "triton" and kind != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(f"--backend triton needs a CUDA device (--device is {device}); use blocks or reference on a CPU")


def load_datamodule(ckpt: str, root: str | None) -> L.LightningDataModule:
    """Rebuild the DataModule a checkpoint was trained with, from the hyperparameters Lightning saved."""
    hparams = dict(read_checkpoint(ckpt).get("datamodule_hyper_parameters") or {})
    class_path = hparams.get("_class_path")
    if not class_path:
        raise InputError(f"checkpoint {ckpt} does not record its DataModule (train it with train.py)")
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if root is not None:
        kwargs["root"] = root
    return cls(**kwargs)


def validation_examples(ckpt: str, root: str | None, n: int) -> torch.Tensor:
    """The first ``n`` validation examples ``[n, 1 + N]`` of the DataModule the checkpoint was trained on."""
    datamodule = load_datamodule(ckpt, root)
    try:
        datamodule.setup("validate")
    except InputError as e:
        if root is not None:
            raise
        raise InputError(f"{e} (the data root the checkpoint recorded; give --data-root where the data is now)") from e
    if n > len(datamodule.val):
        raise InputError(f"--complete {n} asks for more examples than the validation split holds ({len(datamodule.val)})")
    return torch.stack([datamodule.val[i] for i in range(n)])


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

    if args.num_samples < 1:
        raise InputError(f"--num-samples={args.num_samples} must be >= 1")
    if args.length is not None and args.length < 1:
        raise InputError(f"--length={args.length} must be >= 1")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder for the samples")
    check_sampling(args.temperature, args.top_k)
    module = load_model(args.ckpt, args.device, args.backend)
    modality, model = module.modality, module.model
    generator = torch.Generator().manual_seed(args.seed)
    out = Path(args.out) if args.out else (Path(modality.default_out) if modality.default_out else None)

    if args.complete is not None:
        examples = lambda n: validation_examples(args.ckpt, args.data_root, n)  # noqa: E731
        tokens, picture = modality.complete(model, examples, args.complete, args.temperature, args.top_k, generator)
        write_atomic(out / "completions.png", picture)
        print(f"wrote {out / 'completions.png'} (each row: corrupted, completed, original)")
        return [bytes(row.tolist()) for row in tokens]

    prompt = args.prompt.encode("utf-8") if args.prompt is not None else None
    length = modality.sample_length(args.length, model.seq_len, len(modality.first_tokens(prompt)))
    tokens = sample(model, modality, args.num_samples, length, args.temperature, args.top_k, generator, prompt, not args.no_kv_cache)
    samples = [bytes(row.tolist()) for row in tokens]
    if out is None:
        for i, text in enumerate(samples):
            print(f"--- sample {i} ---\n{text.decode('utf-8', errors='replace')}")
        return samples
    for name, data in modality.files(tokens).items():
        write_atomic(out / name, data)
    print(f"wrote {len(samples)} samples to {out}")
    return samples


if __name__ == "__main__":
    run_cli(main)
