"""Checks a checkpoint before a run resumes from it, so a wrong file fails in one line, not mid-restore."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sparse_transformer.errors import InputError


def resolve_ckpt_path(trainer: L.Trainer, ckpt_path: str) -> str:
    """``last`` becomes the newest ``last*.ckpt`` of the run's ModelCheckpoint folders; other paths pass through.

    Lightning starts from scratch when ``last`` finds nothing; asked to resume, we refuse instead, since a
    silently restarted run overwrites the checkpoints it was meant to continue.
    """
    if ckpt_path != "last":
        return ckpt_path
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    found = [Path(p) for c in callbacks for p in c._find_last_checkpoints(trainer)]
    if not found:
        dirs = [str(c.dirpath) for c in callbacks if c.dirpath]
        where = f"in {', '.join(dirs)}" if dirs else "(ModelCheckpoint has no dirpath, so every run writes a new folder)"
        raise InputError(
            f"--ckpt_path last: no last.ckpt {where}; resuming needs a ModelCheckpoint with save_last: true "
            "and a fixed dirpath, or give the checkpoint's path"
        )
    return str(max(found, key=lambda p: p.stat().st_mtime))


# Settings that may change between a run and its resumption: they do not change the function or the optimizer.
FREE_ON_RESUME = {"backend", "recompute"}


def check_resumable(path: str, module: L.LightningModule) -> None:
    """Refuse a missing, unreadable or mismatched checkpoint with one line naming the file and the problem.

    The model's settings must be the checkpoint's (but for ``FREE_ON_RESUME``): a changed ``lr`` would be
    overridden by the restored optimizer anyway, and a changed shape could not be loaded at all.
    """
    if not Path(path).is_file():
        raise InputError(f"checkpoint {path} not found")
    try:
        # mmap: the tensors are not read, so checking a multi-GB checkpoint costs nothing; weights_only: no code runs.
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, ...: the same to a user
        raise InputError(f"checkpoint {path} is not a readable checkpoint ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer_states" not in ckpt:
        raise InputError(
            f"checkpoint {path} has no training state (state_dict and optimizer); resume from one written by train.py"
        )
    saved, current = ckpt.get("hyper_parameters", {}), dict(module.hparams)
    differ = [k for k in current if k in saved and k not in FREE_ON_RESUME and _plain(saved[k]) != _plain(current[k])]
    if differ:
        what = ", ".join(f"{k}: checkpoint {_plain(saved[k])!r}, config {_plain(current[k])!r}" for k in differ)
        raise InputError(
            f"checkpoint {path} does not match the configured model ({what}); resume with the checkpoint's settings or start a new run"
        )
    theirs = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if theirs != ours:
        key = next(k for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k))
        what = f"{key}: checkpoint {theirs.get(key, 'missing')}, model {ours.get(key, 'missing')}"
        raise InputError(f"checkpoint {path} does not match the configured model ({what})")


def _plain(value: object) -> object:
    """A hyperparameter in the form it compares in, whether saved or parsed (tuple or list, dataclass or dict)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return list(value) if isinstance(value, tuple) else value
