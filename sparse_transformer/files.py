"""Files written whole or not at all (checkpoints, samples, results tables, prepared data), into folders checked first."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sparse_transformer.errors import InputError

TEMPORARY_SUFFIX = ".tmp"  # what an interrupted write leaves behind: ".<name>.<random>.tmp" beside the target


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file whose contents appear at ``path`` only when the block completes.

    It is written as a temporary file in the target's own folder (so the rename never crosses a file system
    and needs no room elsewhere), flushed to disk, given the mode a plain ``open`` would, and renamed over
    ``path``, which is atomic on POSIX. On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; readers expect what open() would give
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_folder(folder: Path, what: str, room: int = 0, needs: str = "") -> None:
    """Refuse, in one line naming ``folder``, a folder that cannot take what a command will write: one that is a
    file, cannot be created or written (permissions, a read-only file system, a full disk), or has less than
    ``room`` bytes free (``needs`` says for what). Nothing is left behind: the write test is a temporary file of
    one byte (a full disk still takes an empty file), removed."""
    folder = Path(folder)
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
    except PermissionError as e:
        raise InputError(f"{what} {folder} cannot be reached: permission denied ({e.filename})") from e
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise InputError(f"{what} {folder} {where}; give a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-", suffix=TEMPORARY_SUFFIX)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        doing = "written" if existing == folder else f"created in {existing}"
        raise InputError(f"{what} {folder} cannot be {doing}: {reason(e)}") from e
    check_room(folder, what, room, needs, existing)


def check_room(folder: Path, what: str, room: int, needs: str = "", existing: Path | None = None) -> None:
    """Refuse, in one line naming ``folder``, a file system with less than ``room`` bytes free for ``folder``
    (``existing``: the folder or its nearest existing parent, if it is not there yet)."""
    free = shutil.disk_usage(existing or folder).free
    if free < room:
        raise InputError(
            f"{what} {folder} has {free / 2**20:,.0f} MiB free, and {needs or 'what it will hold'} needs about "
            f"{room / 2**20:,.0f} MiB; free some space or give another folder"
        )


def reason(error: OSError) -> str:
    """Why the file system refused, in words for a one-line message."""
    reasons = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}  # fmt: skip
    return reasons.get(error.errno, error.strerror or type(error).__name__)
