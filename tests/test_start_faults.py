"""Faults found at the start of a run: a full disk, or trainer limits that train nothing or never end. Each is one
``error:`` line, and the run folder is left as it was."""

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

import train
from commands import ROOT, error_line_in_process
from sparse_transformer.errors import InputError
from sparse_transformer.training import cli
from sparse_transformer.training.run_folder import RunLock

TINY = str(ROOT / "configs/tiny.yaml")
NO_SPACE = "no space left on the device"


def start(capsys, command: str, folder: Path, *args: str) -> str:
    return error_line_in_process(capsys, train.main, command, "--config", TINY, "--trainer.default_root_dir", str(folder), *args)


def fill_the_disk(monkeypatch, disk: Path, only: str = "") -> None:
    """The file system under ``disk`` is full: it reports no free bytes and refuses every write of data (with
    ``only``, the writes to files whose name ends so) with ENOSPC, as a full disk does; an empty file still fits."""
    write = os.write

    def full(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(disk)) and target.endswith(only) and data:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10**9, 10**9, 0))


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_full_disk_at_start_is_one_line_and_nothing_is_written(capsys, tmp_path, monkeypatch, command):
    (tmp_path / "existing").mkdir()
    fill_the_disk(monkeypatch, tmp_path)
    existing, new = tmp_path / "existing", tmp_path / "new" / "run"
    assert start(capsys, command, existing) == f"error: run folder {existing} cannot be written: {NO_SPACE}"
    assert start(capsys, command, new) == f"error: run folder {new} cannot be created in {tmp_path}: {NO_SPACE}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing"]


def test_a_disk_that_fills_between_the_check_and_the_lock(tmp_path, monkeypatch):
    fill_the_disk(monkeypatch, tmp_path, only="run.lock")
    with pytest.raises(InputError, match=rf"^run folder {tmp_path / 'a' / 'b'} cannot be written: {NO_SPACE}$"):
        RunLock(tmp_path / "a" / "b").acquire()
    assert list(tmp_path.iterdir()) == []  # the lock file and the folders the start made are gone


def test_a_config_yaml_that_cannot_be_written_is_one_line(capsys, tmp_path, monkeypatch):
    """The disk filled after the start checks passed, before config.yaml: one line, and no logger folder."""

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cli, "write_atomic", full)
    folder = tmp_path / "run"
    assert start(capsys, "fit", folder) == f"error: {folder / 'config.yaml'} cannot be written: {NO_SPACE}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--trainer.max_steps", "0"],
            "trainer.max_steps=0 trains nothing; give a number of steps >= 1, or -1 to let max_epochs decide",
        ),
        (
            ["--trainer.max_steps", "-1", "--trainer.max_epochs", "0"],
            "trainer.max_epochs=0 trains nothing; give a number of epochs >= 1",
        ),
        (
            ["--trainer.limit_train_batches", "0"],
            "trainer.limit_train_batches=0 trains nothing; give batches per epoch >= 1, or a fraction of an epoch in (0, 1]",
        ),
        (
            ["--trainer.max_steps", "-1", "--trainer.max_epochs", "-1"],
            "trainer.max_steps=-1 and max_epochs=-1 give the run no last step, and the learning rate decays to it; set "
            "trainer.max_steps or trainer.max_epochs (trainer.max_time can still stop the run sooner)",
        ),
        (
            ["--trainer.max_steps", "-1", "--trainer.max_time", "00:00:10:00"],
            "trainer.max_steps=-1 and max_time without max_epochs give the run no last step",
        ),
    ],
    ids=["max_steps-0", "max_epochs-0", "limit_train_batches-0", "no-end", "max_time-alone"],
)
def test_a_run_that_trains_nothing_or_never_ends_is_refused_before_anything_is_written(capsys, tmp_path, args, message):
    assert start(capsys, "fit", tmp_path / "run", *args).startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_max_steps_0_still_validates(tmp_path):
    """Only fit trains: validate takes the same trainer options and ignores the step limit."""
    train.main(["validate", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "0",
                "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert (tmp_path / "config.yaml").is_file()
