"""Images and audio end to end through the real command lines: train the tiny configs, sample, bad input."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import train
from commands import ROOT, one_error_line, run
from sparse_transformer.audio_codec import decode, read_codes
from sparse_transformer.modality import Audio
from sparse_transformer.modality import Image as ImageModality

pytestmark = pytest.mark.slow


def train_tiny(config: str, data: Path, out: Path) -> Path:
    result = run(
        "train.py", "fit", "--config", config, "--data.init_args.root", str(data), "--trainer.default_root_dir", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def image_ckpt(images, tmp_path_factory) -> Path:
    return train_tiny("configs/cifar10-tiny.yaml", images, tmp_path_factory.mktemp("image-run"))


@pytest.fixture(scope="module")
def audio_ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    for i in range(4):
        t = np.arange(4000 * (i + 1)) / 16000
        soundfile.write(folder / f"{i}.wav", 0.5 * np.sin(2 * np.pi * 300 * (i + 1) * t), 16000)
    return train_tiny("configs/audio-tiny.yaml", folder, tmp_path_factory.mktemp("audio-run"))


def test_image_training_logs_bits_per_dim_and_samples(image_ckpt):
    state = torch.load(image_ckpt, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["modality"] == ImageModality((8, 8, 3))
    assert state["hyper_parameters"]["network"].seq_len == 192
    (checkpointing,) = [v for k, v in state["callbacks"].items() if k.startswith("RunCheckpoint")]
    assert checkpointing["monitor"] == "val_bpd" and 0 < float(checkpointing["best_model_score"]) < 9
    run = image_ckpt.parents[1]
    (grid,) = run.glob("samples/step=*/samples.png")  # SampleLogger at every second validation: 2 samples, one row
    assert grid.parent.name == "step=6"
    assert Image.open(grid).size == (26 * (2 * 9 + 1), 26 * (9 + 1))  # scaled up to 256 pixels on the short side
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / "version_0")).Reload()
    assert "samples" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("val_bpd")] == [2, 5]  # every 3 steps of the run (logged at the last step index)


def test_sample_writes_a_png_grid_reproducibly(image_ckpt, tmp_path):
    args = ["sample.py", "--ckpt", str(image_ckpt), "--num-samples", "4", "--seed", "3", "--scale", "1"]
    for out in ("a", "b"):
        result = run(*args, "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr[-3000:]
    grid = Image.open(tmp_path / "a" / "samples.png")
    assert grid.size == (2 * 9 + 1, 2 * 9 + 1)  # 2 x 2 images of 8 x 8 with 1-pixel borders
    assert (tmp_path / "a" / "samples.png").read_bytes() == (tmp_path / "b" / "samples.png").read_bytes()


def test_completion_keeps_the_top_half(image_ckpt, images, tmp_path):
    result = run("sample.py", "--ckpt", str(image_ckpt), "--complete", "2", "--scale", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    grid = np.asarray(Image.open(tmp_path / "completions.png").convert("RGB"))
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1, 3)  # rows: images; columns: corrupted, completed, original
    for row in range(2):
        corrupted, completed, original = (grid[1 + 9 * row : 9 + 9 * row, 1 + 9 * c : 9 + 9 * c] for c in range(3))
        assert (original[:4] == completed[:4]).all() and (original[:4] == corrupted[:4]).all()
        assert (corrupted[4:] == 128).all()
        assert any((original == np.asarray(Image.open(p))).all() for p in images.iterdir())
    moved = one_error_line(run("sample.py", "--ckpt", str(image_ckpt), "--complete", "2", "--data-root", str(tmp_path / "gone")))
    assert moved.startswith(f"error: image folder {tmp_path / 'gone'} not found; ")


def test_audio_trains_and_samples_a_wav(audio_ckpt, tmp_path):
    assert torch.load(audio_ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["modality"] == Audio(8000)
    (logged,) = audio_ckpt.parents[1].glob("samples/step=*/sample_0.wav")  # SampleLogger: the config's quarter second
    assert soundfile.info(logged).frames == 2000
    result = run("sample.py", "--ckpt", str(audio_ckpt), "--num-samples", "2", "--length", "100", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for i in range(2):
        info = soundfile.info(tmp_path / f"sample_{i}.wav")
        assert (info.samplerate, info.frames, info.channels) == (8000, 100, 1)
    wrong = one_error_line(run("sample.py", "--ckpt", str(audio_ckpt), "--complete", "1"))
    assert wrong == "error: --complete is not an option for a checkpoint of audio; it takes --prompt-file --length --seconds"


def test_audio_continues_a_recording_past_the_context(audio_ckpt, tmp_path):
    """A 16 kHz stereo prompt is resampled to the model's 8 kHz, kept, and continued for 0.1 s: 800 samples,
    three contexts of 256 and more, so the window slides; the cache and recomputing agree."""
    t = np.arange(3200) / 16000
    tone = 0.4 * np.sin(2 * np.pi * 440 * t)
    soundfile.write(tmp_path / "prompt.wav", np.stack([tone, tone], axis=1), 16000)
    args = ["sample.py", "--ckpt", str(audio_ckpt), "--prompt-file", str(tmp_path / "prompt.wav"), "--seconds", "0.1"]
    for out, extra in (("cached", []), ("recomputed", ["--no-kv-cache"])):
        result = run(*args, *extra, "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr[-3000:]
    wave, rate = soundfile.read(tmp_path / "cached" / "sample_0.wav", dtype="float32")
    assert rate == 8000 and len(wave) == 1600 + 800

    prompt = decode(torch.from_numpy(read_codes(tmp_path / "prompt.wav", 8000))).numpy()
    assert np.abs(wave[:1600] - prompt).max() < 1e-4  # the recording, as 8-bit mu-law, then the continuation
    cached, recomputed = ((tmp_path / d / "sample_0.wav").read_bytes() for d in ("cached", "recomputed"))
    assert cached == recomputed
    missing = one_error_line(run(*args[:4], str(tmp_path / "none.wav")))
    assert missing == f"error: --prompt-file {tmp_path / 'none.wav'} not found"
    both = one_error_line(run(*args, "--length", "10"))
    assert both == "error: give --length or --seconds, not both"


def test_completion_of_a_folder_or_one_file(image_ckpt, images, tmp_path):
    files = sorted(images.iterdir())
    args = ["sample.py", "--ckpt", str(image_ckpt), "--scale", "1"]
    result = run(*args, "--complete", "3", "--complete-from", str(images), "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr[-3000:]
    grid = np.asarray(Image.open(tmp_path / "a" / "completions.png").convert("RGB"))
    originals = [grid[1 + 9 * row : 9 + 9 * row, 1 + 18 : 9 + 18] for row in range(3)]
    for original, file in zip(originals, [files[0], files[6], files[11]]):  # spread over the folder, ends included
        assert (original == np.asarray(Image.open(file))).all()
    one = run(*args, "--complete", "2", "--complete-from", str(files[5]), "--out", str(tmp_path / "b"))
    assert one.returncode == 0, one.stderr[-3000:]
    grid = np.asarray(Image.open(tmp_path / "b" / "completions.png").convert("RGB"))
    for row in range(2):
        assert (grid[1 + 9 * row : 9 + 9 * row, 1 + 18 : 9 + 18] == np.asarray(Image.open(files[5]))).all()
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(run("sample.py", "--ckpt", str(image_ckpt), "--complete", "2", "--complete-from", str(empty)))
    assert line.startswith(f"error: image folder {empty} has no images")
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((8, 6, 3), dtype=np.uint8)).save(odd)
    line = one_error_line(run("sample.py", "--ckpt", str(image_ckpt), "--complete", "1", "--complete-from", str(odd)))
    assert line.startswith(f"error: image {odd} is 8x6 (rows x cols), expected 8x8")


def test_bad_image_data_fails_with_one_line(images, tmp_path):
    wide = tmp_path / "wide"
    wide.mkdir()
    for p in images.iterdir():
        (wide / p.name).write_bytes(p.read_bytes())
    Image.fromarray(np.zeros((8, 6, 3), dtype=np.uint8)).save(wide / "odd.png")
    base = ["train.py", "fit", "--config", "configs/cifar10-tiny.yaml", "--trainer.default_root_dir", str(tmp_path / "run")]
    line = one_error_line(run(*base, "--data.init_args.root", str(wide)))
    assert line.startswith(f"error: image {wide / 'odd.png'} is 8x6 (rows x cols), expected 8x8")


def test_unreadable_audio_fails_with_one_line(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF....WAVE broken")
    (tmp_path / "b.wav").write_bytes(b"")
    args = ["train.py", "fit", "--config", "configs/audio-tiny.yaml", "--trainer.default_root_dir", str(tmp_path / "run")]
    line = one_error_line(run(*args, "--data.init_args.root", str(tmp_path)))
    assert line.startswith(f"error: cannot read audio file {tmp_path / 'a.wav'}")


@pytest.mark.parametrize(("config", "metric"), [("imagenet64-tiny", "val_bpd"), ("enwik8-tiny", "val_bpb")])
def test_the_other_tiny_configs_train(config, metric, images, tmp_path):
    data = ["--data.init_args.root", str(images)] if "imagenet" in config else []
    args = ["fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), "--trainer.default_root_dir", str(tmp_path), *data]
    cli = train.main(args)
    assert cli.trainer.global_step == 6 and metric in cli.trainer.callback_metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
