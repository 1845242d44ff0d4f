"""The data commands the tiny and long image and audio configs name: what they write, that it is the same every
time, that the DataModules read it, and that a missing folder's error names the command."""

import hashlib

import numpy as np
import pytest
import soundfile
from PIL import Image

from sparse_transformer.data import audio, images
from sparse_transformer.data.audio import AudioFolderDataModule, long_audio, tiny_audio
from sparse_transformer.data.images import ImageFolderDataModule, tiny_images
from sparse_transformer.errors import InputError


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_images_are_pngs_of_the_size_asked_and_the_same_every_time(tmp_path):
    assert tiny_images(tmp_path / "a", source="drawn") == "drawn"
    tiny_images(tmp_path / "b", source="drawn")
    files = sorted((tmp_path / "a").iterdir())
    assert len(files) == 64 and digest(tmp_path / "a") == digest(tmp_path / "b")
    pixels = np.stack([np.asarray(Image.open(f)) for f in files])
    assert pixels.shape == (64, 8, 8, 3) and pixels.std() > 20  # pictures, not a constant
    tiny_images(tmp_path / "c", size=16, count=4, source="drawn", seed=1)
    assert [Image.open(f).size for f in sorted((tmp_path / "c").iterdir())] == [(16, 16)] * 4


def test_tiny_images_from_photos_need_scikit_image(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "_skimage_data", lambda: None)
    assert tiny_images(tmp_path / "auto", count=2) == "drawn"  # auto falls back
    with pytest.raises(InputError, match="need scikit-image: pip install scikit-image"):
        tiny_images(tmp_path / "photos", source="photos")


def test_tiny_images_crop_photographs_when_there_are_some(tmp_path, monkeypatch):
    class Photos:  # stands in for skimage.data: one photograph per name
        def __getattr__(self, name):
            rng = np.random.default_rng(len(name))
            return lambda: rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)

    monkeypatch.setattr(images, "_skimage_data", Photos)
    assert tiny_images(tmp_path, count=8) == "photos"
    assert len(list(tmp_path.glob("photos-*.png"))) == 8


def test_tiny_audio_is_wavs_of_tunes_the_same_every_time(tmp_path, monkeypatch):
    monkeypatch.setattr(audio.shutil, "which", lambda program: None)  # no espeak-ng: tones
    assert tiny_audio(tmp_path / "a") == "tones"
    tiny_audio(tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b") and len(digest(tmp_path / "a")) == 8
    wave, rate = soundfile.read(sorted((tmp_path / "a").iterdir())[0])
    assert rate == 8000 and len(wave) == 16000 and 0.05 < np.abs(wave).max() <= 1


def test_tiny_speech_needs_espeak_ng(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("espeak-ng")

    monkeypatch.setattr(audio.subprocess, "run", missing)
    with pytest.raises(InputError, match="needs espeak-ng"):
        tiny_audio(tmp_path, source="speech")


def test_long_audio_is_clips_of_tunes_at_16_khz_the_same_every_time(tmp_path, monkeypatch):
    monkeypatch.setattr(audio.shutil, "which", lambda program: None)  # no espeak-ng: tones
    assert long_audio(tmp_path / "a", count=3, seconds=4.5) == "tones"
    long_audio(tmp_path / "b", count=3, seconds=4.5)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") and len(digest(tmp_path / "a")) == 3
    wave, rate = soundfile.read(sorted((tmp_path / "a").iterdir())[0])
    assert rate == 16000 and len(wave) == 72000 and 0.05 < np.abs(wave).max() <= 1
    data = AudioFolderDataModule(root=str(tmp_path / "a"), sample_rate=16000, seq_len=65536, val_fraction=0.3)
    data.setup("fit")  # a 65,536-step window fits in every clip
    assert len(data.val) == 1 and len(data.train) == 2 * (72000 - 65536 + 1)


def test_long_speech_voices_take_turns_reading_on_past_the_length(tmp_path, monkeypatch):
    spoken = []

    def speak(text, voice):  # a sentence is one second at 100 Hz, its samples the sentence's number
        spoken.append((audio.SENTENCES.index(text), voice))
        return np.full(100, len(spoken) / 100, dtype=np.float32), 100

    monkeypatch.setattr(audio, "_speak", speak)
    assert long_audio(tmp_path, count=8, seconds=2.5, source="speech") == "speech"
    voices = len(audio.VOICES)
    # Three sentences make each clip at least 2.5 s; each voice reads on where its previous clip stopped.
    assert [s for s, v in spoken if v == audio.VOICES[0]] == [0, 1, 2, 3, 4, 5]
    assert [v for s, v in spoken[::3]] == [audio.VOICES[i % voices] for i in range(8)]
    wave, rate = soundfile.read(tmp_path / "speech-00.wav")
    assert rate == 100 and len(wave) == 3 * 100 + 2 * 25  # a quarter second between sentences
    assert np.count_nonzero(wave[100:125]) == 0 and wave[125] > 0


def test_the_tiny_configs_data_modules_read_what_the_commands_write(tmp_path, monkeypatch):
    monkeypatch.setattr(audio.shutil, "which", lambda program: None)
    tiny_images(tmp_path / "images", source="drawn")
    tiny_audio(tmp_path / "audio")
    image_data = ImageFolderDataModule(root=str(tmp_path / "images"), image_size=8, val_fraction=0.25, batch_size=4)
    image_data.setup("fit")
    assert (len(image_data.train), len(image_data.val)) == (48, 16)
    audio_data = AudioFolderDataModule(root=str(tmp_path / "audio"), sample_rate=8000, seq_len=256, val_fraction=0.25)
    audio_data.setup("fit")
    assert len(audio_data.val) == 2 * (16000 // 256)


def test_a_missing_folder_names_the_command_that_makes_one(tmp_path):
    with pytest.raises(InputError) as error:
        ImageFolderDataModule(root=str(tmp_path / "tiny-images"), image_size=16).setup("fit")
    assert str(error.value).endswith(f"python -m sparse_transformer.data.images tiny {tmp_path / 'tiny-images'} --size 16")
    with pytest.raises(InputError) as error:
        AudioFolderDataModule(root=str(tmp_path / "music"), sample_rate=12000, seq_len=65536).setup("fit")
    assert str(error.value).endswith(f"python -m sparse_transformer.data.audio long {tmp_path / 'music'}")
    with pytest.raises(InputError) as error:
        AudioFolderDataModule(root=str(tmp_path / "music"), sample_rate=8000, seq_len=131072).setup("fit")
    assert str(error.value).endswith(f"python -m sparse_transformer.data.audio long {tmp_path / 'music'} --seconds 18")
    with pytest.raises(InputError) as error:
        AudioFolderDataModule(root=str(tmp_path / "tiny-audio"), sample_rate=8000, seq_len=256).setup("fit")
    assert str(error.value).endswith(f"python -m sparse_transformer.data.audio tiny {tmp_path / 'tiny-audio'}")


def test_bad_options_are_one_line(tmp_path):
    with pytest.raises(InputError, match="count=1 must be >= 2"):
        audio.main(["tiny", str(tmp_path), "--count", "1"])
    with pytest.raises(InputError, match="long audio: count=2 must be >= 2 .* and seconds=0.0 > 0"):
        audio.main(["long", str(tmp_path), "--count", "2", "--seconds", "0"])
    with pytest.raises(InputError, match="size=0 must be >= 1"):
        images.main(["tiny", str(tmp_path), "--size", "0"])
