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

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger

from sparse_transformer.errors import InputError
from sparse_transformer.files import FolderLock, check_folder, reason

LOCK = "run.lock"


class RunLock:
    """The exclusive hold of one run on its folder (``files.FolderLock``): :meth:`acquire` when the run starts,
    :meth:`release` when it ends (a dead process releases it by itself)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.lock = FolderLock(self.folder, LOCK, "run folder")

    def acquire(self) -> RunLock:
        """Hold the folder, or refuse in one line, leaving nothing (the disk may fill between the check and the lock)."""
        check_folder(self.folder, "run folder")
        try:
            held = self.lock.take(about=_command())
        except OSError as e:
            self.release()
            raise InputError(f"run folder {self.folder} cannot be written: {reason(e)}") from e
        if not held:
            who = self.lock.holder()
            self.release()
            raise InputError(
                f"run folder {self.folder} is in use by {who}; wait for that run to end, or start this one in another "
                "folder with --trainer.default_root_dir"
            )
        return self

    def release(self) -> None:
        """Unlock, and remove the folders this start created if nothing was written in them."""
        self.lock.release()


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
