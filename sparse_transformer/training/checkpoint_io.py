"""Checkpoints written atomically, in their own folder: a crash during a save never leaves a truncated file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sparse_transformer.files import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, then a rename over it (``files.atomic_file``).

    Lightning's own writer goes through fsspec and the system's temporary folder; this one needs room only
    where the checkpoint goes. Remote URLs (``s3://...``) still go through Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_file(Path(path)) as f:
            torch.save(checkpoint, f)
