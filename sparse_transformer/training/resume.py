"""Checks a checkpoint before a run resumes from it, so a wrong file fails in one line, not mid-restore."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sparse_transformer.errors import InputError

# Settings that may change between a run and its resumption: they do not change the function or the optimizer.
FREE_ON_RESUME = {"network.backend", "network.recompute"}


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
    saved, current = flat(ckpt.get("hyper_parameters", {})), flat(dict(module.hparams))
    differ = [k for k in current if k in saved and k not in FREE_ON_RESUME and saved[k] != current[k]]
    if differ:
        what = ", ".join(f"{k}: checkpoint {saved[k]!r}, config {current[k]!r}" for k in differ)
        raise InputError(
            f"checkpoint {path} does not match the configured model ({what}); resume with the checkpoint's settings or start a new run"
        )
    theirs = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if theirs != ours:
        key = next(k for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k))
        what = f"{key}: checkpoint {theirs.get(key, 'missing')}, model {ours.get(key, 'missing')}"
        raise InputError(f"checkpoint {path} does not match the configured model ({what})")


def flat(hparams: Any, prefix: str = "") -> dict[str, Any]:
    """Hyperparameters as ``{"network.pattern.kind": "strided", ...}``, in the form they compare in whether saved
    or parsed (dataclass or dict, tuple or list); private keys such as LightningCLI's ``_instantiator`` left out."""
    if dataclasses.is_dataclass(hparams):
        hparams = dataclasses.asdict(hparams)
    if not isinstance(hparams, dict):
        return {prefix.removesuffix("."): list(hparams) if isinstance(hparams, tuple) else hparams}
    out = {}
    for key, value in hparams.items():
        if not str(key).startswith("_"):
            out.update(flat(value, f"{prefix}{key}."))
    return out
