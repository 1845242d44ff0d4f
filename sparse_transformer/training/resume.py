"""What makes a run, and the check that a checkpoint belongs to the run that resumes from it.

A checkpoint records its run's identity: the model's options, the data (its DataModule, options and a
fingerprint of its files) and the seed, with a hash of all of them. Resuming from a checkpoint of another run,
from a damaged one (its seal, ``checkpoint_io.py``) or from a file that is no checkpoint of ours, stops in one
line naming the file and what differs, before anything is restored; a resume that goes ahead says in one line
what was checked, the data's fingerprint included. What may change on resume: the attention backend,
recomputation and compilation (they do not change the function), the learning rate and its schedule (a
diverged run resumes with a lower lr), and anything of the trainer's (more steps, other devices, workers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sparse_transformer.errors import InputError
from sparse_transformer.training.checkpoint_io import verify

FREE_ON_RESUME = {
    "model.network.attention.backend", "model.network.recompute", "model.network.compile", "model.lr", "model.warmup_steps",
    "model.min_lr_ratio",
}  # how the same function is computed, and the learning rate
NOT_IDENTITY = {"data.num_workers"}  # how the data is read, not which data


def run_identity(module: L.LightningModule, datamodule: L.LightningDataModule | None, seed: int | None) -> dict[str, Any]:
    """``{"hash": ..., "model.network.d_model": 256, ..., "data.batch_size": 16, "data.file_sha256": ..., "seed": 0}``."""
    identity: dict[str, Any] = {**flat(dict(module.hparams), "model."), "seed": seed}
    if datamodule is not None:
        identity["data.class"] = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
        identity.update(flat({**dict(datamodule.hparams), **fingerprint(datamodule)}, "data."))
    identity = {k: v for k, v in identity.items() if k not in FREE_ON_RESUME | NOT_IDENTITY}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"hash": digest, **identity}


def data_record(datamodule: L.LightningDataModule | None) -> dict[str, Any] | None:
    """The DataModule's class and options, ``{"class_path": ..., "init_args": {...}}``: what a checkpoint keeps so
    ``sample.py`` can rebuild its validation split."""
    if datamodule is None:
        return None
    init_args = {k: v for k, v in dict(datamodule.hparams).items() if not str(k).startswith("_")}
    return {"class_path": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}", "init_args": init_args}


def fingerprint(datamodule: L.LightningDataModule) -> dict[str, Any]:
    return datamodule.fingerprint() if hasattr(datamodule, "fingerprint") else {}


def check_resumable(path: str, module: L.LightningModule, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint at ``path``; a missing, unreadable, damaged or foreign one is refused with one line naming
    the file and the problem.

    With the run's ``identity`` the checkpoint's must match it; a checkpoint that records none (written
    outside ``train.py``) must match the model's options.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer_states" not in ckpt:
        raise InputError(
            f"checkpoint {path} has no training state (state_dict and optimizer); resume from one written by train.py"
        )
    if identity is not None and "run" in ckpt:
        saved, current = ckpt["run"], identity
    else:
        saved = flat(ckpt.get("hyper_parameters", {}), "model.")
        current = {k: v for k, v in flat(dict(module.hparams), "model.").items() if k in saved}
    differ = [k for k in current if k != "hash" and k not in FREE_ON_RESUME and saved.get(k, "(none)") != current[k]]
    if differ:
        what = ", ".join(f"{k}: checkpoint {saved.get(k, '(none)')!r}, config {current[k]!r}" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise InputError(
            f"checkpoint {path} is from another run ({what}{more}); resume it with its own settings, or start a "
            "new run in another folder (--trainer.default_root_dir)"
        )
    theirs = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if theirs != ours:
        key = next(k for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k))
        what = f"{key}: checkpoint {theirs.get(key, 'missing')}, model {ours.get(key, 'missing')}"
        raise InputError(f"checkpoint {path} does not match the configured model ({what})")
    return ckpt


def resume_line(path: str, ckpt: dict[str, Any], identity: dict[str, Any] | None) -> str:
    """What a resume checked, in one line: ``resuming from last.ckpt at step 6: its SHA-256 verified, same model,
    seed and data (the whole file hashed: 466,012 bytes)``."""
    sealed = "its SHA-256 verified" if verify(path) else "no checksum to verify (saved before checkpoints were sealed)"
    data = data_covered(identity or {})
    return f"resuming from {path} at step {ckpt.get('global_step')}: {sealed}, same model, seed and data ({data})"


def data_covered(identity: dict[str, Any]) -> str:
    """What the data's fingerprint covers, from the keys a DataModule's ``fingerprint`` gives."""
    if "data.content_sha256" in identity:
        return f"the whole file hashed: {identity.get('data.file_bytes', 0):,} bytes"
    if "data.contents_sha256" in identity:
        return f"every byte of its {identity.get('data.files', 0):,} files hashed"
    if "data.files_sha256" in identity:
        return f"names and sizes of its {identity.get('data.files', 0):,} files, contents not read"
    return "its options only"


def read_checkpoint(path: str | Path) -> Any:
    """The checkpoint's contents, its seal verified (``checkpoint_io.verify``), without reading its tensors
    again (mmap) or running any code (weights_only)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"checkpoint {path} is a folder; give a .ckpt file (or --ckpt_path last for the run's latest)")
    try:
        if not path.is_file():
            raise InputError(f"checkpoint {path} not found")
        verify(path)
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except PermissionError as e:
        raise InputError(f"checkpoint {path} cannot be read: permission denied") from e
    except InputError:
        raise
    except Exception as e:  # truncated zip, not a torch file, ...: the same to a user
        raise InputError(f"checkpoint {path} is not a readable checkpoint: truncated or not a checkpoint ({type(e).__name__})") from e


def flat(hparams: Any, prefix: str = "") -> dict[str, Any]:
    """Hyperparameters as ``{"model.network.pattern.kind": "strided", ...}``, in the form they compare in whether
    saved or parsed (dataclass or dict, tuple or list); a dataclass also records its class (which attention
    kind, which modality); private keys such as LightningCLI's ``_instantiator`` left out."""
    if dataclasses.is_dataclass(hparams):
        fields = {f.name: getattr(hparams, f.name) for f in dataclasses.fields(hparams)}
        return {f"{prefix}class": type(hparams).__name__, **flat(fields, prefix)}
    if not isinstance(hparams, dict):
        return {prefix.removesuffix("."): list(hparams) if isinstance(hparams, tuple) else hparams}
    out = {}
    for key, value in hparams.items():
        if not str(key).startswith("_"):
            out.update(flat(value, f"{prefix}{key}."))
    return out
