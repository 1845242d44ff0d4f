"""Checkpoints written atomically, in their own folder: a crash during a save never leaves a truncated file."""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sparse_transformer.errors import InputError
from sparse_transformer.files import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, then a rename over it (``files.atomic_file``).

    Lightning's own writer goes through fsspec and the system's temporary folder; this one needs room only
    where the checkpoint goes, and when that room is missing it stops the run in one line naming the folder
    and the bytes needed, leaving the previous checkpoint whole. Remote URLs (``s3://...``) still go through
    Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path.parent.mkdir(parents=True, exist_ok=True)
        needed, free = buffer.tell(), shutil.disk_usage(path.parent).free
        if needed > free:
            raise no_space(path, needed, free)
        try:
            with atomic_file(path) as f:
                f.write(buffer.getbuffer())
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise no_space(path, needed, shutil.disk_usage(path.parent).free) from e
            raise


def no_space(path: Path, needed: int, free: int) -> InputError:
    return InputError(
        f"no space left in {path.parent} for {path.name}: it needs {needed:,} bytes and {free:,} are free "
        f"(the previous {path.name} is intact); free some space and resume with --ckpt_path last"
    )
