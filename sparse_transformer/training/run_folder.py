"""The run folder is checked before anything writes to it, held by one run at a time, and written only once the
run's start checks passed.

- Checked (``files.check_folder``), when the command line is read: it exists or can be created, is a folder,
  can be written (a full disk cannot); and, once the model is built, has room for one checkpoint of it.
- Held: the run's rank 0 holds an exclusive lock on ``<run folder>/run.lock`` (``flock``) for as long as it
  runs, so a second run started in the same folder, even at the same moment, is refused in one line naming the
  process that holds it. The kernel releases the lock when its holder dies, so a lock left by a killed run
  (``kill -9``, a lost node) is taken over by the next start without asking anyone to delete a file. The
  other ranks of a run never take it.
- Written late: the loggers join the trainer, and ``config.yaml`` is written, only once the data, the
  checkpoint to resume from and every other start check passed (``on_fit_start``), so a refused start leaves
  nothing behind: the lock file and any folder the start created are removed with the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger

from sparse_transformer.errors import InputError
from sparse_transformer.files import check_folder, reason

LOCK = "run.lock"
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # file systems without flock


class RunLock:
    """The exclusive hold of one run on its folder: :meth:`acquire` when the run starts, :meth:`release` when it
    ends (a dead process releases it by itself)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.created: list[Path] = []  # folders this start made, removed on release when still empty
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Hold the folder, or refuse in one line, leaving nothing (the disk may fill between the check and the lock)."""
        check_folder(self.folder, "run folder")
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()][::-1]
        try:
            return self._lock()
        except OSError as e:
            self.release()
            raise InputError(f"run folder {self.folder} cannot be written: {reason(e)}") from e

    def _lock(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in UNSUPPORTED:
                    print(f"warning: cannot lock the run folder {self.folder} ({e.strerror}); nothing stops a second run in it",
                          file=sys.stderr)  # fmt: skip
                    return self
                self._refuse()
            if _same_file(fd, self.path):
                self.fd = fd
            else:  # the holder removed the file between our open and our lock: lock the new one
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M:%S')} {_command()}\n".encode())
        return self

    def release(self) -> None:
        """Remove the lock file and unlock (in that order, so a waiting start never locks a removed file), then
        remove the folders this start created if nothing was written in them."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run wrote in it
        self.created = []

    def _refuse(self) -> None:
        holder = ""
        for _ in range(20):  # a holder that just took the lock writes its line a moment later
            holder = self.path.read_text(errors="replace").strip() if self.path.exists() else ""
            if holder:
                break
            time.sleep(0.05)
        pid, host, day, clock, command = (holder.split(" ", 4) + [""] * 5)[:5]
        who = f"process {pid} on {host} (started {day} {clock}: {command})" if pid else "another process"
        raise InputError(
            f"run folder {self.folder} is in use by {who}; wait for that run to end, or start this one in another "
            "folder with --trainer.default_root_dir"
        )


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "python"


class AttachLoggers(L.Callback):
    """Gives the trainer its loggers once the start checks passed: Lightning creates every logger's folder
    (``tensorboard/version_<n>``, ``csv/version_<n>``) before it sets up the data, so loggers handed to the
    Trainer would leave those folders behind a start refused for a missing data file."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.loggers = [*trainer.loggers, *self.loggers]
