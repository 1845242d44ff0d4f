"""Generate from a checkpoint: ``python sample.py --ckpt runs/quickstart/checkpoints/last.ckpt``.

The checkpoint carries the model's configuration and its modality, so nothing else is needed: text models write
``sample_<i>.txt`` (or print), image models a PNG grid, audio models ``sample_<i>.wav``. Text and audio go on
for any length: once the context is full the model's window slides (``sparse_transformer/sampling.py``).
Prompts: text with ``--prompt`` or ``--prompt-file``, audio with ``--prompt-file`` (a recording to continue).
``--complete N`` (images) primes with the top half of N images, from the validation split the checkpoint
recorded or from ``--complete-from``, and writes corrupted / completed / original side by side. Same seed,
same output.
"""

from __future__ import annotations

# ruff: noqa: E402  (threads.configure() runs before the imports that load torch)

import argparse
import dataclasses
import importlib
import os
import sys
import time
from pathlib import Path

from sparse_transformer import threads

threads.configure()  # OpenMP's spin-wait for this machine's load; before torch loads (sparse_transformer/threads.py)

import lightning as L
import torch
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from sparse_transformer.errors import InputError, run_cli
from sparse_transformer.files import write_atomic
from sparse_transformer.model.kernels import BACKENDS
from sparse_transformer.sampling import Sampling, sample
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
        raise InputError(f"--backend triton needs a CUDA device (--device is {device}); use pieces, blocks or reference on a CPU")


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


def spread(count: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(count)``, first and last included."""
    if n > count:
        raise InputError(f"--complete {n} asks for more images than there are ({count})")
    return sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(n)})


def validation_images(ckpt: str, root: str | None, n: int) -> torch.Tensor:
    """``n`` validation images ``[n, 1 + N]`` spread over the split of the DataModule the checkpoint recorded."""
    datamodule = load_datamodule(ckpt, root)
    try:
        datamodule.setup("validate")
    except InputError as e:
        if root is not None:
            raise
        raise InputError(f"{e} (the data root the checkpoint recorded; give --data-root where the data is now)") from e
    return torch.stack([datamodule.val[i] for i in spread(len(datamodule.val), n)])


def images_from(path: Path, shape: tuple[int, int, int], n: int) -> torch.Tensor:
    """``n`` images ``[n, 1 + N]`` from an image file (repeated) or spread over a folder of them."""
    from sparse_transformer.data.images import ImageBytes, ImageFiles, check_image, find_images

    if path.is_file():
        check_image(path, shape)
        files = [path]
    else:
        files = find_images(path, shape)
    images = ImageBytes(ImageFiles(files, shape))
    return torch.stack([images[i] for i in (spread(len(files), n) if len(files) > 1 else [0] * n)])


class Reporter:
    """A rich progress bar with tokens/s, shown once generation has taken longer than ``after`` seconds."""

    def __init__(self, total: int, after: float = 2.0):
        self.total, self.after, self.started, self.progress = total, after, time.perf_counter(), None

    def __call__(self, done: int) -> None:
        elapsed = time.perf_counter() - self.started
        if self.progress is None and elapsed > self.after and done < self.total:
            self.progress = Progress(
                TextColumn("sampling"), BarColumn(), TaskProgressColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=None, transient=True,
            )  # fmt: skip
            self.task = self.progress.add_task("sampling", total=self.total, rate="")
            self.progress.start()
        if self.progress is not None:
            self.progress.update(self.task, completed=done, rate=f"{done / elapsed:,.0f} tokens/s")
            if done >= self.total:
                self.progress.stop()


def main(argv: list[str] | None = None) -> list[bytes]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train.py")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--length", type=int, default=None, help="tokens per sample, any number (default: one context)")
    p.add_argument("--seconds", type=float, default=None, help="audio: the sample's length in seconds")
    p.add_argument("--prompt", default=None, help="text to continue (text models; default: a newline)")
    p.add_argument("--prompt-file", type=Path, default=None, help="text to continue (UTF-8), or audio to continue")
    p.add_argument("--complete", type=int, default=None, metavar="N", help="image completion of N images")
    p.add_argument("--complete-from", type=Path, default=None, help="an image or a folder of them to complete "
                   "(default: the checkpoint's validation split)")  # fmt: skip
    p.add_argument("--data-root", default=None, help="where the validation data is, if not where training read it")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slide", type=int, default=None, help="tokens the window moves once the context is full (default: a quarter of it)")
    p.add_argument("--out", default=None, help="output folder; text is printed without it, other media go to samples/")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="attention backend (default: the checkpoint's)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the window for every token (slow; for checking)")
    args = p.parse_args(argv)

    if args.num_samples < 1:
        raise InputError(f"--num-samples={args.num_samples} must be >= 1")
    if args.length is not None and args.seconds is not None:
        raise InputError("give --length or --seconds, not both")
    if args.seconds is not None and not args.seconds > 0:
        raise InputError(f"--seconds={args.seconds} must be > 0")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder for the samples")
    sampling = Sampling(args.temperature, args.top_k, args.seed, not args.no_kv_cache, args.slide)
    module = load_model(args.ckpt, args.device, args.backend)
    modality, model = module.modality, module.model
    out = Path(args.out) if args.out else (Path(modality.default_out) if modality.default_out else None)

    if args.complete is not None:
        if args.complete_from is not None:
            images = lambda n: images_from(args.complete_from, modality.shape, n)  # noqa: E731
        else:
            images = lambda n: validation_images(args.ckpt, args.data_root, n)  # noqa: E731
        tokens, picture = modality.complete(model, images, args.complete, sampling)
        write_atomic(out / "completions.png", picture)
        print(f"wrote {out / 'completions.png'} (each row: corrupted, completed, original)")
        return [bytes(row.tolist()) for row in tokens]

    prompt = modality.first_tokens(args.prompt.encode("utf-8") if args.prompt is not None else None, args.prompt_file)
    length = args.length if args.seconds is None else round(args.seconds * modality.tokens_per_second())
    length = modality.sample_length(length, model.seq_len, len(prompt))
    reporter = Reporter(args.num_samples * length) if sys.stderr.isatty() else None
    progress = (lambda done: reporter(done * args.num_samples)) if reporter else None
    tokens = sample(model, modality, args.num_samples, length, sampling, prompt, progress)
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
