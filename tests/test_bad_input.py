"""Every bad input to train.py and sample.py gives one ``error:`` line naming it, exit status 2, and nothing
half-written.

Run in-process through the same entry points as the command lines (``run_cli(train.main)``,
``run_cli(sample.main)``); the subprocess tests in test_cli.py cover unknown keys, a pattern stride that does
not tile, a missing data file and sample.py's missing or corrupt checkpoint.
"""

import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import sample
import train
from sparse_transformer.errors import InputError, run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")


def error_line(capsys, main, args: list[str]) -> str:
    """Run a command line's entry point; return its one error line (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: main(args))
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def fails(capsys, *args: str) -> str:
    """``train.py fit`` on tiny.yaml with ``args``."""
    return error_line(capsys, train.main, ["fit", "--config", TINY, *args])


def sampling_fails(capsys, *args: str) -> str:
    return error_line(capsys, sample.main, list(args))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train.main(["fit", "--config", TINY, "--trainer.max_steps", "3", "--trainer.default_root_dir", str(out)])
    return out / "checkpoints" / "last.ckpt"


def test_wrong_type_on_the_command_line(capsys):
    error = fails(capsys, "--model.network.n_layers", "three")
    assert error.startswith("error: Parser key \"model.network.n_layers\": Expected a <class 'int'>. Got value: three")


def test_wrong_type_in_a_config_file(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("data:\n  init_args:\n    batch_size: [4]\n")
    error = fails(capsys, "--config", str(tmp_path / "bad.yaml"))
    assert error == "error: Parser key \"batch_size\": Expected a <class 'int'>. Got value: [4] (see --help)"


IMAGES = ["--data", "sparse_transformer.data.ImageFolderDataModule", "--data.root", "nowhere"]
AUDIO = ["--data", "sparse_transformer.data.AudioFolderDataModule", "--data.root", "nowhere"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.lr", "-1"], "model lr=-1.0 must be a positive number below 1e6"),
        (["--model.lr", "1e38"], "model lr=1e+38 must be a positive number below 1e6"),
        (["--model.warmup_steps", "-5"], "model warmup_steps=-5 must be >= 0"),
        (["--model.network.n_heads", "3"], "d_model=32 is not divisible by n_heads=3"),
        (["--model.network.n_layers", "0"], "model n_layers=0 must be an int >= 1"),
        (["--model.network.dropout", "1.5"], "dropout=1.5 must be in [0, 1)"),
        (["--model.network.pattern.stride", "128"], "pattern stride=128 is longer than the context seq_len=64; use a shorter stride"),
        (
            ["--model.network.positions", "[4, 4]"],
            "positions=[4, 4] multiply to 16, but the data's seq_len is 64; leave positions out to derive them from the data",
        ),
        (["--data.seq_len", "60"], "sequence length 60 is not a positive multiple of block_size=8"),
        (["--data.init_args.batch_size", "0"], "data batch_size=0 must be >= 1"),
        (["--data.init_args.batch_size", "-2"], "data batch_size=-2 must be >= 1"),
        (["--data.init_args.split", "[0.5, 0.5, 0.5]"], "data split [0.5, 0.5, 0.5] must be three non-negative fractions summing to 1"),
        (
            ["--data.init_args.samples_per_epoch", "2"],
            "data samples_per_epoch=2 is less than one batch of batch_size=4; an epoch would train nothing",
        ),
        ([*IMAGES, "--data.channels", "2"], "data channels=2 must be 1 (grey) or 3 (RGB)"),
        ([*IMAGES, "--data.val_fraction", "1.5"], "data val_fraction=1.5 must be between 0 and 1"),
        ([*AUDIO, "--data.sample_rate", "0"], "data sample_rate=0 must be >= 1"),
        (["--trainer.precision", "16-mixed"], "trainer.precision='16-mixed' needs a CUDA GPU (fp16 autocast); on a CPU use 32-true or bf16-mixed"),
    ],
)
def test_bad_values_are_named_in_one_line(capsys, tmp_path, args, message):
    assert fails(capsys, *args, "--trainer.default_root_dir", str(tmp_path)) == f"error: {message}"


def test_a_folder_given_for_a_file(capsys, tmp_path):
    assert fails(capsys, "--data.path", str(tmp_path), "--trainer.default_root_dir", str(tmp_path / "run")) == (
        f"error: data file {tmp_path} is a folder; give data.init_args.path a file of raw bytes"
    )
    assert fails(capsys, "--ckpt_path", str(tmp_path), "--trainer.default_root_dir", str(tmp_path / "run")) == (
        f"error: checkpoint {tmp_path} is a folder; give a .ckpt file (or --ckpt_path last for the run's latest)"
    )


def test_corrupt_enwik8(capsys, tmp_path):
    (tmp_path / "enwik8").write_bytes(b"<mediawiki> cut short")
    args = ["--data", "sparse_transformer.data.Enwik8DataModule", "--data.root", str(tmp_path), "--data.seq_len", "64"]
    error = fails(capsys, *args, "--trainer.default_root_dir", str(tmp_path))
    assert error == f"error: {tmp_path / 'enwik8'} has 21 bytes, enwik8 has 100000000: delete it and download again"


def test_a_truncated_image_is_named(capsys, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(folder / f"{i}.png")
    data = (folder / "3.png").read_bytes()
    (folder / "3.png").write_bytes(data[: len(data) // 2])
    args = ["--config", str(ROOT / "configs/cifar10-tiny.yaml"), "--data.init_args.root", str(folder)]
    error = error_line(capsys, train.main, ["fit", *args, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert error.startswith(f"error: cannot read image {folder / '3.png'}: ")


def test_a_truncated_wav_is_refused(capsys, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    for i in range(3):
        soundfile.write(folder / f"{i}.wav", np.sin(np.arange(4000) / (i + 2)) * 0.5, 8000)
    data = (folder / "2.wav").read_bytes()
    (folder / "2.wav").write_bytes(data[:3000])
    args = ["--config", str(ROOT / "configs/audio-tiny.yaml"), "--data.init_args.root", str(folder)]
    error = error_line(capsys, train.main, ["fit", *args, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert error.startswith(f"error: audio file {folder / '2.wav'} is cut short: its header says 8044 bytes, the file has 3000")


def test_resume_without_a_last_checkpoint(capsys, tmp_path):
    error = fails(capsys, "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path))
    assert error.startswith(f"error: --ckpt_path last: no {tmp_path / 'checkpoints' / 'last.ckpt'}; resume a run by naming its folder")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_an_unreadable_run_folder(capsys, tmp_path, monkeypatch):
    original = pathlib.Path.glob

    def glob(self, pattern):
        if self.name == "checkpoints":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, pattern)

    (tmp_path / "checkpoints").mkdir()
    monkeypatch.setattr(pathlib.Path, "glob", glob)
    error = fails(capsys, "--trainer.default_root_dir", str(tmp_path))
    assert error == f"error: cannot read the run folder {tmp_path}: permission denied ({tmp_path / 'checkpoints'})"


def test_a_new_run_refuses_a_folder_that_holds_another_runs_checkpoints(capsys, checkpoint):
    run = checkpoint.parents[1]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    error = fails(capsys, "--trainer.default_root_dir", str(run), "--model.lr", "1e-3")
    assert error.startswith(f"error: {run} already holds a run's checkpoints (last.ckpt")
    assert "--ckpt_path last" in error and "--trainer.default_root_dir" in error
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing of the old run touched


def test_resume_from_a_missing_or_corrupt_checkpoint(capsys, tmp_path):
    missing = tmp_path / "gone.ckpt"
    assert fails(capsys, "--ckpt_path", str(missing)) == f"error: checkpoint {missing} not found"
    corrupt = tmp_path / "cut.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 half a zip")
    error = fails(capsys, "--ckpt_path", str(corrupt), "--trainer.default_root_dir", str(tmp_path / "run"))
    assert error.startswith(f"error: checkpoint {corrupt} is not a readable checkpoint: truncated or not a checkpoint (")


def test_resume_from_a_checkpoint_of_another_run(capsys, checkpoint, tmp_path):
    run = ["--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(checkpoint)]
    error = fails(capsys, *run, "--model.network.n_layers", "3", "--model.network.d_model", "48")
    differ = "model.network.d_model: checkpoint 32, config 48, model.network.n_layers: checkpoint 2, config 3"
    assert error == (
        f"error: checkpoint {checkpoint} is from another run ({differ}); resume it with its own settings, or start a "
        "new run in another folder (--trainer.default_root_dir)"
    )
    for args, what in [
        (["--seed_everything", "7"], "seed: checkpoint 0, config 7"),
        (["--data.init_args.batch_size", "8"], "data.batch_size: checkpoint 4, config 8"),
        (["--data.init_args.path", str(ROOT / "README.md")], "data.path: checkpoint None, config "),
    ]:
        assert f"is from another run ({what}" in fails(capsys, *run, *args)


def test_resume_from_weights_without_training_state(capsys, checkpoint, tmp_path):
    weights = tmp_path / "weights.ckpt"
    torch.save({"state_dict": torch.load(checkpoint, weights_only=True)["state_dict"]}, weights)
    error = fails(capsys, "--ckpt_path", str(weights), "--trainer.default_root_dir", str(tmp_path / "run"))
    assert error.startswith(f"error: checkpoint {weights} has no training state")


def test_sampling_requests_that_cannot_be_met(capsys, checkpoint, tmp_path, monkeypatch):
    ckpt = ["--ckpt", str(checkpoint)]
    assert sampling_fails(capsys, *ckpt, "--temperature", "nan") == "error: temperature=nan must be a number >= 0 (0 is greedy)"
    assert sampling_fails(capsys, *ckpt, "--top-k", "-3") == "error: top_k=-3 must be >= 1 (or left out: every token)"
    assert sampling_fails(capsys, *ckpt, "--length", "0") == "error: --length=0 must be >= 1"
    (tmp_path / "taken").write_text("x")
    assert sampling_fails(capsys, *ckpt, "--out", str(tmp_path / "taken")) == (
        f"error: --out {tmp_path / 'taken'} is a file; give a folder"
    )
    assert sampling_fails(capsys, *ckpt, "--prompt-file", str(tmp_path / "none.txt")) == (
        f"error: --prompt-file {tmp_path / 'none.txt'} not found"
    )
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert sampling_fails(capsys, *ckpt, "--prompt-file", str(tmp_path / "latin1.txt")) == (
        f"error: --prompt-file {tmp_path / 'latin1.txt'} is not UTF-8 text (byte 3); give a text file"
    )
    taken = "it takes --prompt --prompt-file --length"
    assert sampling_fails(capsys, *ckpt, "--seconds", "2") == f"error: --seconds is not an option for a checkpoint of text; {taken}"
    assert sampling_fails(capsys, *ckpt, "--complete", "2") == f"error: --complete is not an option for a checkpoint of text; {taken}"
    if not torch.cuda.is_available():
        assert sampling_fails(capsys, *ckpt, "--device", "cuda") == "error: --device cuda: no CUDA device here; use --device cpu"
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert sampling_fails(capsys, *ckpt, "--backend", "triton") == (
            "error: --backend triton needs a CUDA device (--device is cpu); use pieces, blocks or reference on a CPU"
        )


def test_sampling_from_a_truncated_checkpoint_or_a_folder(capsys, checkpoint, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(checkpoint.read_bytes()[:5000])
    assert sampling_fails(capsys, "--ckpt", str(cut)).startswith(
        f"error: checkpoint {cut} is not a readable checkpoint: truncated or not a checkpoint ("
    )
    assert sampling_fails(capsys, "--ckpt", str(tmp_path)).startswith(f"error: checkpoint {tmp_path} is a folder")


def test_a_backend_the_cpu_cannot_train_with_is_refused_before_anything_is_written(capsys, tmp_path, monkeypatch):
    from sparse_transformer.model.kernels import blocksparse

    run = tmp_path / "run"
    error = fails(capsys, "--model.network.attention.backend", "flex", "--trainer.default_root_dir", str(run))
    assert error.startswith(
        "error: model.network.attention.backend flex cannot train on this CPU in trainer.precision 32-true "
        "(NotImplementedError: the flex backend has no backward on CPU"
    )
    monkeypatch.setattr(blocksparse, "_INTERPRET", False)  # as on a CPU without TRITON_INTERPRET=1
    error = fails(capsys, "--model.network.attention.backend", "triton", "--trainer.default_root_dir", str(run))
    assert error.startswith("error: model.network.attention.backend triton cannot train on this CPU in trainer.precision 32-true "
                            "(ValueError: the triton backend needs CUDA tensors (got cpu) or TRITON_INTERPRET=1")  # fmt: skip
    assert not run.exists()


def bf16_breaks(q, k, v, layout, block_size, scale=None):
    """A kernel that makes a buffer in the default dtype, as the CPU kernel once did: wrong under bf16-true."""
    if torch.get_default_dtype() != torch.float32:
        raise RuntimeError(f"expected scalar type Float but found {torch.get_default_dtype()}")
    return q * 1.0


def test_a_precision_the_backend_cannot_train_in_is_refused(capsys, tmp_path, monkeypatch):
    from sparse_transformer.model import kernels

    monkeypatch.setitem(kernels.BACKENDS, "reference", "test_bad_input:bf16_breaks")
    args = ["--model.network.attention.backend", "reference", "--trainer.default_root_dir", str(tmp_path / "run")]
    assert fails(capsys, *args, "--trainer.precision", "bf16-true") == (
        "error: model.network.attention.backend reference cannot train on this CPU in trainer.precision bf16-true "
        "(RuntimeError: expected scalar type Float but found torch.bfloat16); choose another backend or precision"
    )


def test_a_context_longer_than_the_data_is_refused_before_building_the_model(capsys, tmp_path):
    run = ["--trainer.default_root_dir", str(tmp_path / "run")]
    assert fails(capsys, "--data.seq_len", "1048576", *run).startswith("error: train split of ")


def test_float_audio_with_a_nan_sample_is_refused_naming_the_frame(capsys, tmp_path):
    from sparse_transformer.modality import Audio

    folder = tmp_path / "audio"
    folder.mkdir()
    for i in range(3):
        wave = (np.sin(np.arange(4000) / (i + 2)) * 0.5).astype(np.float32)
        if i == 1:
            wave[1234] = np.nan
        soundfile.write(folder / f"{i}.wav", wave, 8000, subtype="FLOAT")
    args = ["--config", str(ROOT / "configs/audio-tiny.yaml"), "--data.init_args.root", str(folder)]
    error = error_line(capsys, train.main, ["fit", *args, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert error == f"error: audio file {folder / '1.wav'} has a nan sample at frame 1,234 (0.154 s) and 1 bad frames in all; repair or remove the file"
    with pytest.raises(InputError, match=r"has a nan sample at frame 1,234 \(0.154 s\)"):  # a recording to continue
        Audio(8000).prompt(file=folder / "1.wav")


@pytest.mark.parametrize("limit,said", [(1000, 2000), (3000, 3000)], ids=["error", "warning"])  # PIL errs over twice it
def test_an_image_over_the_decompression_bomb_limit_is_one_line(capsys, tmp_path, monkeypatch, limit, said):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(folder / "4.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # 64 x 64 is over it, as a bomb is over the real one
    args = ["--config", str(ROOT / "configs/cifar10-tiny.yaml"), "--data.init_args.root", str(folder)]
    error = error_line(capsys, train.main, ["fit", *args, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert error == (
        f"error: cannot read image {folder / '4.png'}: Image size (4096 pixels) exceeds limit of {said} pixels, "
        "could be decompression bomb DOS attack."
    )


def test_an_image_whose_name_is_not_utf8_trains(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(folder / f"{i}.png")
    os.rename(folder / "3.png", os.fsdecode(bytes(folder) + b"/caf\xe9.png"))
    args = ["--config", str(ROOT / "configs/cifar10-tiny.yaml"), "--data.init_args.root", str(folder), "--trainer.max_steps", "1"]
    train.main(["fit", *args, "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
