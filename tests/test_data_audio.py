"""The audio DataModule on WAV / FLAC files the tests write: mono, resampling, mu-law windows, splits."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from sparse_transformer.audio_codec import decode, read_codes
from sparse_transformer.data.audio import AudioFolderDataModule
from sparse_transformer.errors import InputError
from sparse_transformer.modality import START, Audio


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "audio"
    root.mkdir()
    for i in range(4):  # 0.1 .. 0.4 s of a tone at 16 kHz
        t = np.arange(1600 * (i + 1)) / 16000
        soundfile.write(root / f"clip{i}.wav", 0.5 * np.sin(2 * np.pi * 200 * (i + 1) * t), 16000)
    stereo = np.stack([np.full(4000, 0.25), np.full(4000, -0.75)], axis=1)  # mono mean: -0.25
    soundfile.write(root / "stereo.flac", stereo, 8000)
    return root


def test_files_are_mono_resampled_mu_law(folder):
    codes = read_codes(folder / "stereo.flac", 8000)
    assert codes.dtype == np.uint8 and codes.shape == (4000,)
    assert torch.allclose(decode(torch.from_numpy(codes)), torch.tensor(-0.25), atol=0.01)
    assert read_codes(folder / "clip0.wav", 8000).shape == (800,)  # 1600 samples at 16 kHz -> 8 kHz


def test_windows_splits_and_shapes(folder):
    dm = AudioFolderDataModule(root=str(folder), sample_rate=8000, seq_len=100, val_fraction=0.4, batch_size=2)
    dm.setup()
    assert dm.modality == Audio(8000)
    assert (len(dm.train_files), len(dm.val_files)) == (3, 2)
    assert not set(dm.train_files) & set(dm.val_files)
    lengths = {
        f.name: {"clip0.wav": 800, "clip1.wav": 1600, "clip2.wav": 2400, "clip3.wav": 3200, "stereo.flac": 4000}[f.name]
        for f in dm.train_files + dm.val_files
    }
    assert len(dm.train) == sum(lengths[f.name] - 100 + 1 for f in dm.train_files)  # every start, step 1
    assert len(dm.val) == sum(lengths[f.name] // 100 for f in dm.val_files)  # non-overlapping
    window = dm.val[len(dm.val) - 1]
    assert window.shape == (101,) and window[0] == START and window.dtype == torch.long


def test_training_windows_are_reproducible_given_the_seed(folder):
    def batches(seed: int) -> torch.Tensor:
        dm = AudioFolderDataModule(root=str(folder), sample_rate=8000, seq_len=64, batch_size=4, samples_per_epoch=8, seed=seed)
        dm.setup()
        return torch.cat(list(dm.train_dataloader()))

    a, b, c = batches(3), batches(3), batches(4)
    assert a.shape == (8, 65) and torch.equal(a, b) and not torch.equal(a, c)


def test_workers_give_the_same_batches(folder):
    kwargs = {"root": str(folder), "sample_rate": 8000, "seq_len": 64, "batch_size": 4}
    serial, workers = AudioFolderDataModule(**kwargs), AudioFolderDataModule(**kwargs, num_workers=2)
    serial.setup(), workers.setup()
    assert torch.equal(torch.cat(list(serial.val_dataloader())), torch.cat(list(workers.val_dataloader())))


def test_bad_audio_fails_with_one_line(folder, tmp_path):
    with pytest.raises(InputError, match="audio folder .* not found"):
        AudioFolderDataModule(root=str(tmp_path / "none")).setup()
    with pytest.raises(InputError, match="all shorter than seq_len=65536"):
        AudioFolderDataModule(root=str(folder), sample_rate=8000).setup()
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    with pytest.raises(InputError, match=r"cannot read audio file .*broken.wav") as e:
        AudioFolderDataModule(root=str(folder), sample_rate=8000, seq_len=64).setup()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".ogg", ".mp3", ".aiff"])
def test_every_format_soundfile_reads_is_read(tmp_path, suffix):
    t = np.arange(8000) / 8000
    soundfile.write(tmp_path / f"tone{suffix}", 0.5 * np.sin(2 * np.pi * 440 * t), 8000)
    codes = read_codes(tmp_path / f"tone{suffix}", 8000)
    assert abs(len(codes) - 8000) < 1200  # compressed formats pad or trim a frame at the ends
    assert decode(torch.from_numpy(codes)).abs().max() > 0.4


def test_unreadable_formats_and_cut_files_are_refused_in_one_line(folder):
    (folder / "talk.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A ")
    dm = AudioFolderDataModule(root=str(folder), sample_rate=8000, seq_len=100)
    with pytest.raises(InputError, match=r"talk.m4a: .m4a is not a format soundfile reads here \(.wav .flac .ogg"):
        dm.setup()
    (folder / "talk.m4a").unlink()
    (folder / "notes.txt").write_text("not audio: ignored")
    cut = (folder / "clip3.wav").read_bytes()
    (folder / "clip3.wav").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(InputError, match=r"clip3.wav is cut short: its header says \d+ bytes, the file has \d+"):
        dm.setup()
