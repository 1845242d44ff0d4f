"""The run folder: every way it cannot be used is one line naming it, before anything is written; one run at a
time holds it (a second start is refused naming the holder, a killed holder's lock is taken over); a refused
start leaves nothing behind."""

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest

import sample
import train
from commands import ROOT, error_line_in_process
from sparse_transformer.training.distributed import launched_as_rank_zero
from sparse_transformer.training.run_folder import LOCK, RunLock

TINY = str(ROOT / "configs/tiny.yaml")


def start(capsys, folder: Path, *args: str) -> str:
    return error_line_in_process(capsys, train.main, "fit", "--config", TINY, "--trainer.default_root_dir", str(folder), *args)


def test_a_folder_that_is_a_file_or_under_one(capsys, tmp_path):
    (tmp_path / "taken").write_text("x")
    assert start(capsys, tmp_path / "taken") == f"error: run folder {tmp_path / 'taken'} is a file; give a folder"
    assert start(capsys, tmp_path / "taken" / "run") == (
        f"error: run folder {tmp_path / 'taken' / 'run'} cannot be created: {tmp_path / 'taken'} is a file; give a folder"
    )


@pytest.mark.parametrize("code,reason", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_a_folder_that_cannot_be_written(capsys, tmp_path, monkeypatch, code, reason):
    """As root every folder is writable, so the file system's refusal is simulated where the check meets it."""

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert start(capsys, tmp_path) == f"error: run folder {tmp_path} cannot be written: {reason}"
    assert start(capsys, tmp_path / "new") == f"error: run folder {tmp_path / 'new'} cannot be created in {tmp_path}: {reason}"
    assert list(tmp_path.iterdir()) == []


def test_a_disk_without_room_for_one_checkpoint(capsys, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 1000, 1000))
    error = start(capsys, tmp_path / "run")
    assert error.startswith(f"error: run folder {tmp_path / 'run'} has 0 MiB free, and one checkpoint (weights and AdamW state) needs about ")
    assert list(tmp_path.iterdir()) == []  # the folder the start made is gone with it


def test_a_refused_start_leaves_nothing_behind(capsys, tmp_path):
    """A missing data file is found after the model and the trainer are built: no logger folder, config or lock."""
    (tmp_path / "existing").mkdir()
    for folder in (tmp_path / "existing", tmp_path / "new" / "run"):
        error = start(capsys, folder, "--data.path", str(tmp_path / "missing.txt"))
        assert error.startswith(f"error: data file {tmp_path / 'missing.txt'} not found")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing"]


HOLDER = "import sys, time; from sparse_transformer.training.run_folder import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"


def test_a_second_run_in_a_held_folder_is_refused_and_a_killed_holders_lock_is_taken_over(capsys, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        error = start(capsys, tmp_path, "--trainer.max_steps", "1")
        assert error.startswith(f"error: run folder {tmp_path} is in use by process {holder.pid} on ")
        assert error.endswith("; wait for that run to end, or start this one in another folder with --trainer.default_root_dir")
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]  # the holder's, untouched
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK).exists()  # what kill -9 leaves: a file, no lock
    train.main(["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1",
                "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert (tmp_path / "checkpoints" / "last.ckpt").exists() and not (tmp_path / LOCK).exists()


def test_the_lock_is_exclusive_within_a_process_too_and_released(tmp_path):
    lock = RunLock(tmp_path / "a" / "b").acquire()
    assert (tmp_path / "a" / "b" / LOCK).read_text().split()[0] == str(os.getpid())
    with pytest.raises(Exception, match="is in use by process"):
        RunLock(tmp_path / "a" / "b").acquire()
    lock.release()
    assert list(tmp_path.iterdir()) == []  # the folders it made, empty, went with it
    RunLock(tmp_path / "a").acquire().release()


@pytest.mark.parametrize(
    "env,zero",
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"RANK": "3"}, False),
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # Lightning's launcher: ranks 1.. of a node
        ({"NODE_RANK": "1"}, False),
        ({"SLURM_PROCID": "0"}, True),
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # Lightning's launcher inside an allocation
        ({"SLURM_PROCID": "5"}, False),
    ],
)
def test_only_rank_zero_of_a_run_takes_the_lock(monkeypatch, env, zero):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launched_as_rank_zero() is zero


def test_sample_out_that_cannot_be_written_is_refused_before_sampling(capsys, tmp_path, monkeypatch):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    train.main(["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "1",
                "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"])  # fmt: skip

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "samples"
    assert error_line_in_process(capsys, sample.main, "--ckpt", str(ckpt), "--out", str(out)) == (
        f"error: --out {out} cannot be created in {tmp_path}: read-only file system"
    )
