"""Every bad input to train.py gives one ``error:`` line naming it, exit status 2, and nothing half-written.

Run in-process through the same entry point as the command line (``run_cli(train.main)``); the subprocess
tests in test_cli.py cover unknown keys, a pattern stride that does not tile, a missing data file and
sample.py's missing or corrupt checkpoint.
"""

from pathlib import Path

import pytest
import torch

import train
from sparse_transformer.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")


def fails(capsys, *args: str) -> str:
    """Run ``train.py fit`` on tiny.yaml with ``args``; return its one error line."""
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: train.main(["fit", "--config", TINY, *args]))
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


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


def test_model_options_are_checked_where_they_are_declared(capsys, tmp_path):
    error = fails(capsys, "--model.network.n_heads", "3", "--trainer.default_root_dir", str(tmp_path))
    assert error == "error: d_model=32 is not divisible by n_heads=3"


def test_a_data_module_refusal_is_one_line(capsys, tmp_path):
    error = fails(capsys, "--data", "sparse_transformer.data.ImageFolderDataModule", "--data.root", str(tmp_path), "--data.channels", "2")
    assert error == "error: image_size=32 must be >= 1 and channels=2 must be 1 or 3"


def test_positions_that_contradict_the_data(capsys, tmp_path):
    error = fails(capsys, "--model.network.positions", "[4, 4]", "--trainer.default_root_dir", str(tmp_path))
    assert error == "error: positions=[4, 4] multiply to 16, but the data's seq_len is 64; leave positions out to derive them from the data"


def test_sequence_length_that_does_not_tile(capsys, tmp_path):
    error = fails(capsys, "--data.seq_len", "60", "--trainer.default_root_dir", str(tmp_path))
    assert error == "error: sequence length 60 is not a positive multiple of block_size=8"


def test_corrupt_enwik8(capsys, tmp_path):
    (tmp_path / "enwik8").write_bytes(b"<mediawiki> cut short")
    args = ["--data", "sparse_transformer.data.Enwik8DataModule", "--data.root", str(tmp_path), "--data.seq_len", "64"]
    error = fails(capsys, *args, "--trainer.default_root_dir", str(tmp_path))
    assert error == f"error: {tmp_path / 'enwik8'} has 21 bytes, enwik8 has 100000000: delete it and download again"


def test_resume_without_a_last_checkpoint(capsys, tmp_path):
    error = fails(capsys, "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path))
    assert error.startswith(f"error: --ckpt_path last: no {tmp_path / 'checkpoints' / 'last.ckpt'}; resume a run by naming its folder")
    assert not list(tmp_path.rglob("*.ckpt"))


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
    error = fails(capsys, "--ckpt_path", str(corrupt))
    assert error.startswith(f"error: checkpoint {corrupt} is not a readable checkpoint (")


def test_resume_from_a_checkpoint_of_another_model(capsys, checkpoint):
    error = fails(capsys, "--ckpt_path", str(checkpoint), "--model.network.n_layers", "3", "--model.network.d_model", "48")
    differ = "network.d_model: checkpoint 32, config 48, network.n_layers: checkpoint 2, config 3"
    assert (
        error
        == f"error: checkpoint {checkpoint} does not match the configured model ({differ}); resume with the checkpoint's settings or start a new run"
    )


def test_resume_from_weights_without_training_state(capsys, checkpoint, tmp_path):
    weights = tmp_path / "weights.ckpt"
    torch.save({"state_dict": torch.load(checkpoint, weights_only=True)["state_dict"]}, weights)
    error = fails(capsys, "--ckpt_path", str(weights))
    assert error.startswith(f"error: checkpoint {weights} has no training state")
