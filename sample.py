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
import sys
from pathlib import Path


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is none to show (its help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("``", ""), formatter_class=HelpWithDefaults)
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train.py")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw")
    p.add_argument("--length", type=int, default=None, help="text, audio: tokens per sample, any number (default: one context)")
    p.add_argument("--seconds", type=float, default=None, help="audio: the sample's length in seconds")
    p.add_argument("--prompt", default=None, help="text: what to continue (default: a newline)")
    p.add_argument("--prompt-file", type=Path, default=None, help="text: a UTF-8 file to continue; audio: a recording to continue")
    p.add_argument("--complete", type=int, default=None, metavar="N", help="images: complete the bottom half of N images")
    p.add_argument("--complete-from", type=Path, default=None, help="images: an image or a folder of them to complete "
                   "(default: the checkpoint's validation split)")  # fmt: skip
    p.add_argument("--data-root", default=None, help="images: where the validation data is, if not where training read it")
    p.add_argument("--scale", type=int, default=None, help="images: screen pixels per image pixel (default: 256 on the short side)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="draw among the k likeliest tokens (default: all)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same samples")
    p.add_argument("--slide", type=int, default=None, help="tokens the window moves once the context is full (default: a quarter of it)")
    p.add_argument("--out", default=None, help="output folder (default: text is printed, other media go to samples/)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:<index> (default: cuda if there is one, else cpu)")
    p.add_argument("--backend", default=None, help="attention backend: auto, triton, pieces, blocks, flex, reference, ... "
                   "(default: the checkpoint's)")  # fmt: skip
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the window for every token (slow; for checking)")
    return p


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    parser().parse_args()  # the help, at once: before torch and Lightning load, which takes seconds

import dataclasses
import importlib
import os
import time

from sparse_transformer import threads

threads.configure()  # OpenMP's spin-wait for this machine's load; before torch loads (sparse_transformer/threads.py)

import lightning as L
import torch

from sparse_transformer.data.images import ImageBytes, ImageFiles, check_image, find_images
from sparse_transformer.errors import InputError, plural, run_cli
from sparse_transformer.files import check_folder, write_atomic
from sparse_transformer.modality import Modality
from sparse_transformer.model import ModelConfig
from sparse_transformer.model.kernels import BACKENDS
from sparse_transformer.sampling import Sampling, complete, sample
from sparse_transformer.terminal import StatusLine, clock, quiet_third_party
from sparse_transformer.training.lightning_module import SparseTransformerLM
from sparse_transformer.training import signals
from sparse_transformer.training.finite import first_non_finite
from sparse_transformer.training.resume import read_checkpoint

# Options whose meaning depends on what the checkpoint models; each modality declares those it takes.
MODALITY_OPTIONS = ("prompt", "prompt_file", "length", "seconds", "complete", "complete_from", "data_root", "scale")


def load_model(ckpt: str, device: str, backend: str | None = None) -> SparseTransformerLM:
    check_device(device, backend)
    saved = read_checkpoint(ckpt)
    network = saved.get("hyper_parameters", {}).get("network") if isinstance(saved, dict) else None
    if not isinstance(network, ModelConfig) or "state_dict" not in saved:
        raise InputError(f"checkpoint {ckpt} is not a Sparse Transformer checkpoint (no model options or weights); train one with train.py")
    overrides = {}
    if backend:
        if not hasattr(network.attention, "backend"):
            raise InputError(f"--backend picks a block-sparse kernel; this checkpoint's attention is {network.attention.name!r}")
        overrides["network"] = dataclasses.replace(network, attention=dataclasses.replace(network.attention, backend=backend))
    try:
        module = SparseTransformerLM.load_from_checkpoint(ckpt, map_location=device, **overrides)
    except RuntimeError as e:  # the weights do not fit the configuration the checkpoint records
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))[:300]
        raise InputError(f"checkpoint {ckpt} does not match the model it describes ({detail})") from e
    check_finite(ckpt, module)
    return module.eval()


def check_finite(ckpt: str, module: SparseTransformerLM) -> None:
    """Refuse weights holding a NaN or an infinity (train.py never writes them; another program might)."""
    bad = first_non_finite(module.named_parameters())
    if bad is not None:
        raise InputError(f"checkpoint {ckpt} holds weights that are not finite ({bad[0]} holds {bad[1]}); sample from an earlier checkpoint")


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
    """Rebuild the DataModule a checkpoint was trained with, from the record ``train.py`` keeps in it."""
    record = read_checkpoint(ckpt).get("data")
    if not record:
        raise InputError(f"checkpoint {ckpt} does not record its data (train it with train.py, or give --complete-from)")
    module_name, _, class_name = record["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**{**record["init_args"], **({"root": root} if root is not None else {})})


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
    if path.is_file():
        check_image(path, shape)
        files = [path]
    else:
        files = find_images(path, shape)
    images = ImageBytes(ImageFiles(files, shape))
    return torch.stack([images[i] for i in (spread(len(files), n) if len(files) > 1 else [0] * n)])


class Reporter:
    """Sampling progress on stderr once generation has taken longer than ``after`` seconds: a line with a bar,
    tokens/s and the time left on a terminal; plain lines every ``every`` seconds elsewhere (a job's log)."""

    def __init__(self, total: int, after: float = 2.0, every: float = 30.0):
        self.total, self.after, self.started = total, after, time.perf_counter()
        self.status = StatusLine(every)

    def __call__(self, done: int) -> None:
        elapsed = time.perf_counter() - self.started
        if elapsed < self.after or not self.status.due():
            return
        rate = done / elapsed
        left = clock((self.total - done) / rate) if rate > 0 else "?"
        timing = f"{clock(elapsed)}<{left}" if self.status.live else f"{clock(elapsed)} elapsed, {left} left"
        self.status.update(f"sampling {done:,}/{self.total:,} tokens", f"{rate:,.0f} tok/s  {timing}", done / self.total)

    def close(self) -> None:
        self.status.clear()


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse values no checkpoint could take, in one line, before the checkpoint is read."""
    if args.num_samples < 1:
        raise InputError(f"--num-samples={args.num_samples} must be >= 1")
    if args.length is not None and args.seconds is not None:
        raise InputError("give --length or --seconds, not both")
    if args.length is not None and args.length < 1:
        raise InputError(f"--length={args.length} must be >= 1")
    if args.seconds is not None and not args.seconds > 0:
        raise InputError(f"--seconds={args.seconds} must be > 0")
    if args.complete is not None and args.complete < 1:
        raise InputError(f"--complete {args.complete}: give the number of images to complete, at least 1")
    if args.scale is not None and args.scale < 1:
        raise InputError(f"--scale={args.scale} must be >= 1")
    if args.backend is not None and args.backend not in ("auto", *BACKENDS):
        raise InputError(f"--backend {args.backend} is not one of auto, {', '.join(BACKENDS)}")


def check_modality_options(args: argparse.Namespace, modality: Modality) -> None:
    """Refuse an option the checkpoint's modality does not take (``--complete`` for text), naming those it does."""
    for name in MODALITY_OPTIONS:
        if getattr(args, name) is not None and name not in modality.options:
            taken = " ".join(f"--{o.replace('_', '-')}" for o in modality.options)
            raise InputError(f"--{name.replace('_', '-')} is not an option for a checkpoint of {modality.noun}; it takes {taken}")


def main(argv: list[str] | None = None) -> list[bytes]:
    args = parser().parse_args(argv)
    quiet_third_party()
    check_arguments(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sampling = Sampling(args.temperature, args.top_k, args.seed, not args.no_kv_cache, args.slide)
    module = load_model(args.ckpt, device, args.backend)
    modality, model = module.modality, module.model
    check_modality_options(args, modality)
    out = Path(args.out) if args.out else (Path(modality.default_out) if modality.default_out else None)
    if out is not None:  # before any sampling: a folder that cannot be written is found now, not after an hour
        check_folder(out, "--out")

    if args.complete is not None:
        if args.complete_from is not None:
            originals = images_from(args.complete_from, modality.shape, args.complete)
        else:
            originals = validation_images(args.ckpt, args.data_root, args.complete)
        completed = complete(model, originals, modality.top_half, sampling)
        write_atomic(out / "completions.png", modality.comparison(originals, completed.cpu(), args.scale))
        print(f"wrote {out / 'completions.png'} (each row: corrupted, completed, original)")
        return [bytes(row.tolist()) for row in modality.strip(completed)]

    prompt = modality.prompt(args.prompt, args.prompt_file)
    length = args.length if args.seconds is None else max(1, round(args.seconds * modality.sample_rate))
    length = length or modality.default_length(model.seq_len, len(prompt))
    reporter = Reporter(args.num_samples * length)
    tokens = sample(model, modality, args.num_samples, length, sampling, prompt, lambda done: reporter(done * args.num_samples))
    reporter.close()
    samples = [bytes(row.tolist()) for row in tokens]
    if out is None:
        for i, text in enumerate(samples):
            print(f"--- sample {i} ---\n{text.decode('utf-8', errors='replace')}")
        return samples
    files = modality.files(tokens, args.scale)
    for name, data in files.items():
        write_atomic(out / name, data)
    names = ", ".join(files) if len(files) <= 4 else f"{next(iter(files))} ... {list(files)[-1]}"
    print(f"wrote {plural(len(files), 'file')} to {out}/: {names}")
    return samples


if __name__ == "__main__":
    signals.install(signals.stop_at_once("while sampling"))  # 130 / 143 and one line, not a traceback
    run_cli(main)
