"""Files written whole or not at all (checkpoints, samples, results tables, prepared data), into folders checked first
and held by one process at a time."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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


UNSUPPORTED_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # file systems without flock


class FolderLock:
    """One process at a time in ``folder``: an exclusive ``flock`` on ``<folder>/<name>``, which the kernel releases
    when its holder dies, so a lock left by a killed process (``kill -9``, a lost node) is taken by the next one
    without anyone deleting a file. The file says who holds it (:meth:`holder`). It is removed before it is
    unlocked, so a process that waited checks that the file it locked is still the lock's. Folders made for the
    lock are removed on :meth:`release` when nothing was written in them.

    Args:
        folder: what is held; created with its missing parents.
        name: the lock file's name in it.
        what: the folder in messages (``run folder``, ``data folder``).
    """

    def __init__(self, folder: str | Path, name: str, what: str):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / name
        self.created: list[Path] = []  # folders the lock made, removed on release when still empty
        self.fd: int | None = None

    def take(self, waiting: Callable[[str], None] | None = None, about: str = "") -> bool:
        """Hold the folder; False if another process does and ``waiting`` is None, else call ``waiting`` with the
        holder's line and wait for it. On a file system without locks, warn and go on unheld. ``about`` is written
        in the lock file after the process, host and time (what this process is doing)."""
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()][::-1]
        self.folder.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if waiting is None:
                        os.close(fd)
                        return False
                    waiting(self.holder())
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                os.close(fd)
                if e.errno not in UNSUPPORTED_LOCKS:
                    raise
                print(f"warning: cannot lock the {self.what} {self.folder} ({e.strerror}); nothing stops a second process in it",
                      file=sys.stderr)  # fmt: skip
                return True
            if _same_file(fd, self.path):
                self.fd = fd
            else:  # the holder removed the file between our open and our lock: lock the new one
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M:%S')} {about}".strip().encode() + b"\n")
        return True

    def holder(self) -> str:
        """``process 123 on host (since 2026-12-04 10:00:00: what it does)``, or ``another process``."""
        line = ""
        for _ in range(20):  # a holder that just took the lock writes its line a moment later
            line = self.path.read_text(errors="replace").strip() if self.path.exists() else ""
            if line:
                break
            time.sleep(0.05)
        pid, host, day, clock, about = (line.split(" ", 4) + [""] * 5)[:5]
        if not pid:
            return "another process"
        return f"process {pid} on {host} (since {day} {clock}" + (f": {about})" if about else ")")

    def release(self) -> None:
        """Remove the lock file and unlock (in that order, so a waiting process never locks a removed file), then
        remove the folders the lock made if nothing was written in them."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: something was written in it
        self.created = []


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False
