"""Raw audio as byte sequences: a folder of audio files -> mono, resampled, 8-bit mu-law windows.

The paper's classical-music model (section 7.4) reads 65,536-step windows of 8-bit mu-law audio. Files
are decoded once in ``setup`` (``audio_codec.py``), mixed to mono, resampled to ``sample_rate`` and
mu-law encoded to one byte per step, and held in memory: one byte a step is
43 MB per hour at 12 kHz. A window becomes ``[START, code_0, ..., code_{N-1}]``, like an image.
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from torch.utils.data import Dataset

from sparse_transformer.audio_codec import AUDIO_SUFFIXES, UNREADABLE_SUFFIXES, read_codes
from sparse_transformer.data.sequences import SequenceDataModule, files_fingerprint
from sparse_transformer.errors import InputError, plural, run_cli
from sparse_transformer.files import atomic_file
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
            raise InputError(
                f"audio folder {self.root} not found; put recordings there (WAV, FLAC, ...), or make some: "
                f"python -m sparse_transformer.data.audio {self._maker()}"
            )
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

    def _maker(self) -> str:
        """The data command that fills ``root`` with clips long enough for this window: tiny ones up to a second,
        else long ones, longer than their default where the window needs it (a window and room to draw it from)."""
        window = self.seq_len / self.sample_rate
        if window <= 1:
            return f"tiny {self.root}"
        seconds = math.ceil(window) + 1
        return f"long {self.root}" + (f" --seconds {seconds}" if seconds > LONG_SECONDS else "")


# Made audio: python -m sparse_transformer.data.audio tiny data/tiny-audio (configs/audio-tiny.yaml),
# python -m sparse_transformer.data.audio long data/long-audio (configs/audio-long.yaml).

SENTENCES = (
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.", "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.", "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.", "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.", "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.", "Read verse out loud for pleasure.",
)  # Harvard sentences, lists 1 to 3 (IEEE, 1969)
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+f2", "en-029", "en-gb-scotland+m3")  # tiny: the first four
PENTATONIC = (0, 2, 4, 7, 9)  # semitones above the root: any order of these notes sounds like a tune
LONG_SECONDS, LONG_RATE = 8.0, 16_000  # a 65,536-step window at 16 kHz is 4.1 s: each clip holds one and room


def tiny_audio(folder: Path, count: int = 8, seconds: float = 2.0, source: str = "auto", seed: int = 0) -> str:
    """Write ``count`` short mono WAVs to ``folder``, the same files for the same arguments.

    ``tones``: tunes of plucked notes (a pentatonic scale, three harmonics, a decay) over faint noise, drawn
    from a seeded generator, ``seconds`` long at 8 kHz. ``speech``: one sentence each, which espeak-ng speaks in
    one of four voices (22,050 Hz; needs the espeak-ng program). ``auto`` takes speech when espeak-ng is
    installed. Returns the source used.
    """
    source = _resolve("tiny", count, seconds, source)
    if source == "tones":
        rng = np.random.default_rng(seed)
        clips = [(_tune(seconds, 8000, rng), 8000) for _ in range(count)]
    else:
        clips = [_speak(SENTENCES[i % 8], VOICES[i % 4]) for i in range(count)]
    _write(folder, source, clips)
    return source


def long_audio(folder: Path, count: int = 24, seconds: float = LONG_SECONDS, source: str = "auto", seed: int = 0) -> str:
    """Write ``count`` mono WAVs of at least ``seconds`` each to ``folder``, the same files for the same arguments:
    data for windows of seconds, such as configs/audio-long.yaml's 65,536 steps at 16 kHz.

    ``tones``: tunes as :func:`tiny_audio` makes them, at 16 kHz. ``speech``: six voices take turns reading the
    Harvard sentences, each voice going on where its previous clip stopped, a quarter second between sentences,
    a clip ending with the first sentence that takes it past ``seconds`` (22,050 Hz). ``auto`` takes speech
    when espeak-ng is installed. Returns the source used.
    """
    source = _resolve("long", count, seconds, source)
    if source == "tones":
        rng = np.random.default_rng(seed)
        clips = [(_tune(seconds, LONG_RATE, rng), LONG_RATE) for _ in range(count)]
    else:
        read = [0] * len(VOICES)  # the next sentence of each voice
        clips = []
        for i in range(count):
            voice = i % len(VOICES)
            parts: list[np.ndarray] = []
            while True:
                waveform, rate = _speak(SENTENCES[read[voice] % len(SENTENCES)], VOICES[voice])
                read[voice] += 1
                parts.append(waveform)
                if sum(map(len, parts)) >= seconds * rate:
                    break
                parts.append(np.zeros(rate // 4, dtype=np.float32))
            clips.append((np.concatenate(parts), rate))
    _write(folder, source, clips)
    return source


def _resolve(kind: str, count: int, seconds: float, source: str) -> str:
    """The source to use (``auto``: speech when espeak-ng is installed, else tones); bad options in one line."""
    if count < 2 or not seconds > 0:
        raise InputError(f"{kind} audio: count={count} must be >= 2 (one is held out) and seconds={seconds} > 0")
    if source not in ("auto", "tones", "speech"):
        raise InputError(f"{kind} audio: source={source!r} must be auto, tones or speech")
    if source == "auto":
        return "speech" if shutil.which("espeak-ng") else "tones"
    return source


def _write(folder: Path, source: str, clips: list[tuple[np.ndarray, int]]) -> None:
    for i, (waveform, rate) in enumerate(clips):
        with atomic_file(Path(folder) / f"{source}-{i:02d}.wav") as f:
            soundfile.write(f, waveform, rate, format="WAV", subtype="PCM_16")


def _tune(seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Plucked notes of a pentatonic scale, an eighth to a quarter of a second each, over faint noise."""
    out = rng.normal(0, 0.01, int(seconds * rate)).astype(np.float32)
    root, start = rng.uniform(110, 220), 0
    while start < len(out):
        length = int(rng.choice([0.125, 0.25]) * rate)
        t = np.arange(min(length, len(out) - start)) / rate
        pitch = root * 2 ** ((rng.choice(PENTATONIC) + 12 * rng.integers(0, 2)) / 12)
        note = sum(np.sin(2 * np.pi * k * pitch * t) / k for k in (1, 2, 3)) * np.exp(-6 * t)
        out[start : start + len(t)] += 0.3 * note
        start += length
    return out.clip(-1, 1)


def _speak(text: str, voice: str) -> tuple[np.ndarray, int]:
    try:
        spoken = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], check=True, capture_output=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        raise InputError(f"audio from speech needs espeak-ng (apt install espeak-ng), or --source tones: {e}") from e
    waveform, rate = soundfile.read(io.BytesIO(spoken), dtype="float32")
    return waveform, rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparse_transformer.data.audio", description="Make audio data.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, maker, count, seconds, what in (
        ("tiny", "configs/audio-tiny.yaml", 8, 2.0, "Write a few short WAVs, the same files every time, in seconds."),
        ("long", "configs/audio-long.yaml", 24, LONG_SECONDS, "Write a few minutes of WAVs, the same files every time, "
         "clips long enough for windows of seconds (speech: about a minute to make)."),
    ):  # fmt: skip
        command = commands.add_parser(
            name, help=f"a folder of WAVs for {maker}", description=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        command.add_argument("folder", type=Path, help="where the WAVs go (created)")
        command.add_argument("--count", type=int, default=count, help="how many")
        command.add_argument("--seconds", type=float, default=seconds,
                             help="tones: the length of each" + ("" if name == "tiny" else "; speech: the least length of each"))  # fmt: skip
        command.add_argument("--source", choices=("auto", "tones", "speech"), default="auto",
                             help="tones: tunes of plucked notes; speech: sentences espeak-ng speaks; auto: speech if espeak-ng is installed")  # fmt: skip
        command.add_argument("--seed", type=int, default=0, help="tones: seeds the tunes")
    args = parser.parse_args(argv)
    make = tiny_audio if args.command == "tiny" else long_audio
    source = make(args.folder, args.count, args.seconds, args.source, args.seed)
    if source == "tones":
        what = f"tunes of {args.seconds:g} s at {8 if args.command == 'tiny' else LONG_RATE // 1000} kHz"
    elif args.command == "tiny":
        what = "sentences espeak-ng speaks"
    else:
        what = f"sentences espeak-ng reads in {len(VOICES)} voices, at least {args.seconds:g} s each"
    print(f"wrote {args.count} WAVs to {args.folder}/: {what}")


if __name__ == "__main__":
    run_cli(main)
