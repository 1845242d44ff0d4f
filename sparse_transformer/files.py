"""Files written whole or not at all: checkpoints, samples, results tables, prepared data."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

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
