"""Text as raw bytes: a LightningDataModule over any file, the shipped corpus, or enwik8."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sparse_transformer.data.download import TIMEOUT, Remote, file_checksum, prepare
from sparse_transformer.data.sequences import SequenceDataModule
from sparse_transformer.errors import InputError, run_cli
from sparse_transformer.modality import Text

# The Python Language Reference as the interpreter ships it (pydoc_data.topics), 466 KB of English
# prose with code; see corpus/README.md. Needs no download, so the quickstart runs offline.
EMBEDDED_CORPUS = Path(__file__).parent / "corpus" / "python_reference.txt"

# The archive's sha256 as huggingface/datasets (datasets/enwik8/dataset_infos.json) and others record it: the
# page publishes only the md5 of the unpacked file, and an archive is checked before it is unpacked.
ENWIK8_ZIP = Remote(
    "http://mattmahoney.net/dc/enwik8.zip", 36_445_475, "sha256:547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
)
ENWIK8_SIZE = 100_000_000
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"  # published at mattmahoney.net/dc/textdata.html


class ByteWindows(Dataset):
    """Windows of ``seq_len + 1`` bytes (inputs and next-byte targets) of bytes [begin, end), ``step`` apart.

    The file is memory-mapped lazily, so worker processes open their own map instead of pickling bytes.
    """

    def __init__(self, path: Path, begin: int, end: int, seq_len: int, step: int):
        self.path, self.seq_len = path, seq_len
        self.starts = range(begin, end - seq_len, step)
        self._bytes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._bytes is None:
            self._bytes = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self.starts[i]
        return torch.from_numpy(self._bytes[start : start + self.seq_len + 1].astype(np.int64))


class ByteTextDataModule(SequenceDataModule):
    """Next-byte modelling on a file of raw bytes, split by position into train / val / test.

    Training draws random windows (with replacement, so an epoch costs nothing to set up on 100 MB);
    validation and test read contiguous non-overlapping windows, the standard way to report bits/byte.

    Args:
        path: file of raw bytes; None uses the shipped corpus (offline).
        seq_len: context length N; the model's ``seq_len`` is linked to it.
        split: fractions of the file for train, val, test, in file order.
        batch_size: windows per batch (per device).
        samples_per_epoch: training windows per epoch over all devices; None means one pass worth (train bytes / seq_len).
        seed: seeds the training sampler, so a run's window sequence is reproducible (and resumable).
    """

    modality = Text()

    def __init__(
        self,
        path: str | None = None,
        seq_len: int = 256,
        split: tuple[float, float, float] = (0.9, 0.05, 0.05),
        batch_size: int = 16,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        seed: int = 1234,
    ):
        super().__init__(batch_size, samples_per_epoch, num_workers, seed)
        self.save_hyperparameters()
        if len(split) != 3 or abs(sum(split) - 1) > 1e-6 or min(split) < 0:
            raise InputError(f"data split {list(split)} must be three non-negative fractions summing to 1")
        if seq_len < 1:
            raise InputError(f"data seq_len={seq_len} must be >= 1")
        self.path = Path(path) if path else EMBEDDED_CORPUS
        self.seq_len, self.split = seq_len, split
        if self.path.is_file():  # now, before the model builds its layouts for a context no window of the data fills
            self.check_file()

    def check_file(self) -> None:
        """What can be checked of the file without reading it: that train and val hold a window each."""
        self._check_windows(self.path.stat().st_size)

    def setup(self, stage: str | None = None) -> None:
        if self.path.is_dir():
            raise InputError(f"data file {self.path} is a folder; give data.init_args.path a file of raw bytes")
        if not self.path.is_file():
            raise InputError(f"data file {self.path} not found; give data.init_args.path a file of raw bytes")
        b = self._check_windows(self.path.stat().st_size)
        self.train = ByteWindows(self.path, b[0], b[1], self.seq_len, step=1)
        self.val = ByteWindows(self.path, b[1], b[2], self.seq_len, step=self.seq_len)
        self.test = ByteWindows(self.path, b[2], b[3], self.seq_len, step=self.seq_len)

    def _check_windows(self, size: int) -> list[int]:
        """The splits' boundaries in a file of ``size`` bytes; refused if train or val holds no window of seq_len + 1."""
        b = [round(c * size) for c in np.cumsum([0, *self.split])]
        for name, (begin, end) in (("train", b[0:2]), ("val", b[1:3])):
            if end - begin <= self.seq_len:
                raise InputError(
                    f"{name} split of {self.path} ({size} bytes, split {list(self.split)}) is shorter than "
                    f"seq_len + 1 = {self.seq_len + 1} bytes"
                )
        return b

    def epoch_size(self) -> int:
        return len(self.train) // self.seq_len  # one pass worth of bytes

    def fingerprint(self) -> dict[str, Any]:
        """The file's size and the SHA-256 of all of it, so a file changed anywhere is another run's data: 0.17-0.36 s
        for 100 MB on this project's CPU (``bench/results/trust-cpu.md``), once per start."""
        with self.path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
        return {"file_bytes": self.path.stat().st_size, "content_sha256": digest}


class Enwik8DataModule(ByteTextDataModule):
    """enwik8 (first 10^8 bytes of an English Wikipedia dump) with the standard 90M / 5M / 5M split.

    Args:
        root: folder holding the ``enwik8`` file (100,000,000 bytes).
        download: fetch and verify it from mattmahoney.net when absent (needs internet; :func:`prepare_enwik8`).
    """

    def __init__(self, root: str = "data/enwik8", download: bool = False, **kwargs):
        super().__init__(path=str(Path(root) / "enwik8"), split=(0.9, 0.05, 0.05), **kwargs)
        self.download = download

    def prepare_data(self) -> None:
        if self.download and not self.path.exists():  # one there is checked in setup, once
            prepare_enwik8(self.path.parent)

    def check_file(self) -> None:
        """Its size (its md5 in setup): a file that is enwik8 holds windows of any context a layout can have."""
        check_enwik8_size(self.path)

    def setup(self, stage: str | None = None) -> None:
        """Checked on every rank, where a failure reaches the others (``training/distributed.py``)."""
        if not self.path.is_file():
            raise InputError(
                f"enwik8 not found at {self.path}; set data.init_args.download=true or run "
                f"`python -m sparse_transformer.data.text {self.path.parent}`"
            )
        verify_enwik8(self.path)
        super().setup(stage)


def check_enwik8_size(path: Path) -> None:
    size = path.stat().st_size
    if size != ENWIK8_SIZE:
        raise InputError(f"{path} has {size} bytes, enwik8 has {ENWIK8_SIZE}: delete it and download again")


def verify_enwik8(path: Path) -> None:
    check_enwik8_size(path)
    digest = file_checksum(path, "md5")
    if digest != ENWIK8_MD5:
        raise InputError(f"{path} has md5 {digest}, enwik8 has {ENWIK8_MD5}: delete it and download again")


def enwik8_complete(path: Path) -> bool:
    """True when ``path`` is enwik8 (size and md5 checked), False when nothing is there; refused when it is another file."""
    if not path.exists():
        return False
    if not path.is_file():
        raise InputError(f"{path} is not a file; enwik8 is one file of {ENWIK8_SIZE} bytes: move it away and download again")
    verify_enwik8(path)
    return True


def prepare_enwik8(root: Path, timeout: float = TIMEOUT) -> Path:
    """Download enwik8.zip (resumable, sha256-checked), unpack it and check enwik8's size and md5; the file appears
    only when complete, and one there already is checked and kept (``data/download.py``)."""
    root = Path(root)
    by_hand = f"fetch enwik8.zip elsewhere and unpack its enwik8 into {root}"
    return prepare(ENWIK8_ZIP, root / "enwik8", enwik8_complete, ENWIK8_SIZE, by_hand, timeout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_transformer.data.text",
        description="Download enwik8 into a folder: resumable, checksum-checked, unpacked atomically; nothing to do when it is there.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("folder", type=Path, nargs="?", default=Path("data/enwik8"), help="where enwik8 goes (created)")
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT, help="seconds without a byte before a connection counts as stalled"
    )
    args = parser.parse_args(argv)
    prepare_enwik8(args.folder, args.timeout)


if __name__ == "__main__":
    run_cli(main)
