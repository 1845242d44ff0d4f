"""Raw audio as byte sequences: a folder of audio files -> mono, resampled, 8-bit mu-law windows.

The paper's classical-music model (section 7.4) reads 65,536-step windows of 8-bit mu-law audio. Files
are decoded once in ``setup`` (``audio_codec.py``), mixed to mono, resampled to ``sample_rate`` and
mu-law encoded to one byte per step, and held in memory: one byte a step is
43 MB per hour at 12 kHz. A window becomes ``[START, code_0, ..., code_{N-1}]``, like an image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sparse_transformer.audio_codec import AUDIO_SUFFIXES, UNREADABLE_SUFFIXES, read_codes
from sparse_transformer.data.sequences import SequenceDataModule, files_fingerprint
from sparse_transformer.errors import InputError, plural
from sparse_transformer.modality import START, Audio

class AudioWindows(Dataset):
    """Windows of ``seq_len`` codes, ``step`` apart within each clip (never across two clips)."""

    def __init__(self, clips: list[np.ndarray], seq_len: int, step: int):
        self.clips, self.seq_len, self.step = clips, seq_len, step
        counts = [max(0, (len(c) - seq_len) // step + 1) for c in clips]
        self.ends = np.cumsum(counts)  # window i lies in the first clip whose end exceeds i

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int) -> torch.Tensor:
        clip = int(np.searchsorted(self.ends, i, side="right"))
        start = (i - (self.ends[clip - 1] if clip else 0)) * self.step
        codes = torch.from_numpy(self.clips[clip][start : start + self.seq_len].astype(np.int64))
        return torch.cat([torch.tensor([START]), codes])


class AudioFolderDataModule(SequenceDataModule):
    """A folder of audio files (searched recursively: WAV, FLAC, OGG, MP3, AIFF and the other formats libsndfile
    reads), split by file into train and val.

    Training draws windows at random positions with replacement (seeded); validation and test read
    non-overlapping windows of the held-out files in order.

    Args:
        root: the folder.
        sample_rate: every file is resampled to this rate (the paper's music: 12 kHz).
        seq_len: window length in samples; the model's context (the paper: 65,536).
        val_fraction: share of the files held out for validation (and test), drawn with ``seed``.
        batch_size: windows per batch (per device).
        samples_per_epoch: training windows per epoch; None is one pass worth (training steps / seq_len).
        seed: seeds the file split and the training sampler.
    """

    def __init__(
        self,
        root: str,
        sample_rate: int = 12_000,
        seq_len: int = 65_536,
        val_fraction: float = 0.1,
        batch_size: int = 1,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        seed: int = 1234,
    ):
        super().__init__(batch_size, samples_per_epoch, num_workers, seed)
        self.save_hyperparameters()
        if not 0 < val_fraction < 1:
            raise InputError(f"data val_fraction={val_fraction} must be between 0 and 1")
        for name, value in (("sample_rate", sample_rate), ("seq_len", seq_len)):
            if value < 1:
                raise InputError(f"data {name}={value} must be >= 1")
        self.root, self.sample_rate, self.seq_len, self.val_fraction = Path(root), sample_rate, seq_len, val_fraction

    @property
    def modality(self) -> Audio:
        return Audio(self.sample_rate)

    def setup(self, stage: str | None = None) -> None:
        if self.root.is_file():
            raise InputError(f"audio folder {self.root} is a file; give the folder that holds the recordings")
        if not self.root.is_dir():
            raise InputError(f"audio folder {self.root} not found")
        found = sorted(p for p in self.root.rglob("*") if p.is_file())
        unreadable = [p for p in found if p.suffix.lower() in UNREADABLE_SUFFIXES]
        if unreadable:
            raise InputError(
                f"audio file {unreadable[0]}: {unreadable[0].suffix} is not a format soundfile reads here "
                f"({' '.join(AUDIO_SUFFIXES)}); convert it, e.g. ffmpeg -i {unreadable[0].name} {unreadable[0].stem}.flac"
            )
        files = [p for p in found if p.suffix.lower() in AUDIO_SUFFIXES]
        if len(files) < 2:
            raise InputError(
                f"audio folder {self.root} has {plural(len(files), 'audio file')} ({' '.join(AUDIO_SUFFIXES)}); "
                "need at least 2 to hold one out for validation"
            )
        self.files = files
        n_val = min(max(1, round(self.val_fraction * len(files))), len(files) - 1)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train_files = [files[i] for i in sorted(order[n_val:])]
        self.val_files = [files[i] for i in sorted(order[:n_val])]
        self.train = AudioWindows([read_codes(f, self.sample_rate) for f in self.train_files], self.seq_len, step=1)
        val_clips = [read_codes(f, self.sample_rate) for f in self.val_files]
        self.val = self.test = AudioWindows(val_clips, self.seq_len, step=self.seq_len)
        for name, part, clips in (("train", self.train, self.train_files), ("val", self.val, self.val_files)):
            if len(part) == 0:
                raise InputError(
                    f"{name} audio files ({len(clips)} under {self.root}) are all shorter than seq_len={self.seq_len} "
                    f"samples at {self.sample_rate} Hz"
                )

    def epoch_size(self) -> int:
        return len(self.train) // self.seq_len  # one pass worth of audio

    def fingerprint(self) -> dict[str, Any]:
        """Names, sizes and every byte of the files: setup decodes them whole anyway."""
        return files_fingerprint(self.files, self.root, contents=True)
