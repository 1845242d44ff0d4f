"""Every checkpoint is sealed with the SHA-256 of its contents, and the seal is checked on resume and in sample.py:
a single flipped bit inside a tensor is one line naming the file."""

import struct
import zipfile
from pathlib import Path

import pytest
import torch

import sample
import train
from commands import ROOT, error_line_in_process
from sparse_transformer.errors import InputError
from sparse_transformer.training.checkpoint_io import CHECKSUM, AtomicCheckpointIO, verify
from sparse_transformer.training.resume import read_checkpoint

TINY = str(ROOT / "configs/tiny.yaml")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train.main(["fit", "--config", TINY, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out)])  # fmt: skip
    return out / "checkpoints" / "last.ckpt"


def flip_a_bit_in(path: Path, record_suffix: str, out: Path) -> Path:
    """A copy of ``path`` with one bit flipped in the middle of the largest record whose name ends so."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if i.filename.endswith(record_suffix)), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    out.write_bytes(bytes(data))
    return out


def test_a_checkpoint_carries_its_seal_and_still_loads(checkpoint):
    with zipfile.ZipFile(checkpoint) as archive:
        assert any(name.endswith(f"/{CHECKSUM}") for name in archive.namelist())
    assert verify(checkpoint) is True
    assert torch.load(checkpoint, weights_only=False, mmap=True)["global_step"] == 2
    assert read_checkpoint(checkpoint)["global_step"] == 2


def test_a_flipped_bit_inside_a_tensor_or_the_options_is_caught(checkpoint, tmp_path):
    for record in ("/data/0", "data.pkl"):
        damaged = flip_a_bit_in(checkpoint, record, tmp_path / f"damaged{record.replace('/', '_')}.ckpt")
        if record == "/data/0":
            torch.load(damaged, weights_only=False, mmap=True)  # torch itself does not notice
        with pytest.raises(InputError, match=rf"checkpoint {damaged} is damaged: its contents do not match the SHA-256 it was saved with"):
            verify(damaged)


def test_an_unsealed_checkpoint_is_read_without_a_check(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert verify(path) is False
    assert read_checkpoint(path)["state_dict"]["w"].tolist() == [1.0, 1.0]


def test_the_writer_seals_what_it_writes(tmp_path):
    path = tmp_path / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "global_step": 7}, path)
    assert verify(path) and AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 7


def test_resuming_or_sampling_from_a_damaged_checkpoint_is_one_line(capsys, checkpoint, tmp_path):
    damaged = flip_a_bit_in(checkpoint, "/data/0", tmp_path / "last.ckpt")
    line = f"error: checkpoint {damaged} is damaged: its contents do not match the SHA-256 it was saved with"
    args = ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "resumed"), "--ckpt_path", str(damaged)]
    assert error_line_in_process(capsys, train.main, *args).startswith(line)
    assert error_line_in_process(capsys, sample.main, "--ckpt", str(damaged)).startswith(line)


def test_the_resume_line_says_what_was_checked(caplog, checkpoint, tmp_path):
    run = tmp_path / "resumed"
    train.main(["fit", "--config", TINY, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run), "--ckpt_path", str(checkpoint)])  # fmt: skip
    size = (ROOT / "sparse_transformer/data/corpus/python_reference.txt").stat().st_size
    assert (
        f"resuming from {checkpoint} at step 2: its SHA-256 verified, same model, seed and data "
        f"(the whole file hashed: {size:,} bytes)"
    ) in caplog.text
