"""Checkpoints written whole, finite and sealed, and checked when they are read back.

- Whole: written to a temporary file in their own folder and renamed over the old one, so a crash during a
  save never leaves a truncated file, and a full disk stops the run in one line.
- Finite: weights or optimizer state holding a NaN or an infinity are never written (``finite.py``); the
  previous file stays as it was.
- Sealed: a checkpoint is a zip archive (``torch.save``); after writing it in memory, the SHA-256 of every byte
  of its records is added as a record of its own (``<archive>/.data/sha256``), which ``torch.load`` ignores.
  :func:`verify` recomputes it: a flipped bit anywhere in the weights, the optimizer state or the pickled
  options is named in one line instead of being resumed from or sampled from.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sparse_transformer.errors import InputError
from sparse_transformer.files import atomic_file
from sparse_transformer.training.finite import first_non_finite, tensors_of

CHECKSUM = ".data/sha256"  # the seal's record, inside the archive's own folder
CHUNK = 1 << 24  # bytes read at a time when verifying


class NotFinite(InputError):
    """What a save was refused for: ``name`` holds ``value`` (nan or inf) at ``step``."""

    def __init__(self, path: Path, name: str, value: float, step: int | None):
        self.path, self.name, self.value, self.step = path, name, value, step
        kept = _kept(path)
        super().__init__(
            f"not saving {path}: {name} holds {value} at step {step} (the weights diverged; {kept}); "
            "resume from an earlier checkpoint with a lower --model.lr or a more stable precision"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into memory, checked and sealed, then into a temporary file beside the target and renamed
    over it (``files.atomic_file``).

    Lightning's own writer goes through fsspec and the system's temporary folder; this one needs room only
    where the checkpoint goes, and when that room is missing it stops the run in one line naming the folder
    and the bytes needed. Remote URLs (``s3://...``) still go through Lightning's writer, unsealed.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        trained = {key: checkpoint[key] for key in ("state_dict", "optimizer_states") if key in checkpoint}
        bad = first_non_finite(tensors_of(trained))
        if bad is not None:
            raise NotFinite(path, *bad, checkpoint.get("global_step"))
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        seal(buffer)
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

    def load_checkpoint(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if "://" not in str(path):
            verify(path)
        return super().load_checkpoint(path, *args, **kwargs)


def seal(buffer: io.BytesIO) -> None:
    """Add to the archive ``torch.save`` wrote into ``buffer`` the SHA-256 of every byte before its central
    directory (all its records), as one more record; ``buffer`` is left positioned at its end."""
    with zipfile.ZipFile(buffer, "a") as archive:
        folder = archive.namelist()[0].split("/")[0]
        digest = hashlib.sha256(buffer.getbuffer()[: archive.start_dir]).hexdigest()
        archive.writestr(f"{folder}/{CHECKSUM}", digest)
    buffer.seek(0, io.SEEK_END)


def verify(path: str | os.PathLike) -> bool:
    """True if the checkpoint at ``path`` carries a seal its contents match, False if it carries none (written
    before seals, or by another program); a mismatch is one line naming the file."""
    stat = Path(path).stat()
    return _verify(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=16)
def _verify(path: str, size: int, mtime_ns: int, inode: int) -> bool:
    """Cached per version of the file: resuming reads a checkpoint twice, and sample.py up to three times."""
    if not zipfile.is_zipfile(path):
        return False  # not an archive: torch.load says what it is
    try:
        with zipfile.ZipFile(path) as archive:
            record = next((i for i in archive.infolist() if i.filename.endswith(f"/{CHECKSUM}")), None)
            if record is None:
                return False
            expected = archive.read(record).decode("ascii", errors="replace")
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InputError(f"checkpoint {path} is not a readable checkpoint: truncated or not a checkpoint ({type(e).__name__})") from e
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = record.header_offset
        while left > 0 and (chunk := f.read(min(CHUNK, left))):
            digest.update(chunk)
            left -= len(chunk)
    if left or digest.hexdigest() != expected:
        raise InputError(
            f"checkpoint {path} is damaged: its contents do not match the SHA-256 it was saved with "
            "(a changed or corrupted file); resume or sample from another checkpoint"
        )
    return True


class NoSpace(InputError):
    """A checkpoint did not fit on its disk; nothing of it was written."""


def no_space(path: Path, needed: int, free: int) -> NoSpace:
    kept = _kept(path)
    return NoSpace(
        f"no space left in {path.parent} for {path.name}: it needs {needed:,} bytes and {free:,} are free "
        f"({kept}); free some space and resume from the last checkpoint"
    )


def _kept(path: Path) -> str:
    """What a refused save left of ``path``, for its message."""
    return f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
