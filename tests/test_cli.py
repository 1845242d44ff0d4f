"""End to end through the real command lines: train the tiny config, sample from its checkpoint, bad input."""

import dataclasses
from pathlib import Path

import pytest
import torch

import train
from commands import ROOT, one_error_line, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    result = run("train.py", "fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "checkpoints" / "last.ckpt"


def test_fit_writes_checkpoints_and_metrics(checkpoint):
    files = {p.name for p in checkpoint.parent.iterdir()}
    assert "last.ckpt" in files and any(f.startswith("step=") and "-val_bpb=" in f for f in files)
    run = checkpoint.parents[1]  # everything the run wrote is in its folder
    assert {p.name for p in run.iterdir()} == {"checkpoints", "tensorboard", "csv", "samples", "config.yaml"}
    assert (run / "csv" / "version_0" / "metrics.csv").is_file() and list((run / "samples").glob("step=6/sample_*.txt"))

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    network = state["hyper_parameters"]["network"]  # the resolved config the model was built from
    assert network.pattern.kind == "strided" and network.pattern.stride == 16 and network.positions == (64,)
    assert network.seq_len == 64  # linked from data.seq_len


def test_sample_is_reproducible_and_written(checkpoint, tmp_path):
    args = ["sample.py", "--ckpt", str(checkpoint), "--num-samples", "2", "--length", "40", "--seed", "7"]
    first = run(*args, "--prompt", "The ", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(*args, "--prompt", "The ", "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr[-3000:]
    a = sorted((tmp_path / "a").iterdir())
    assert [p.name for p in a] == ["sample_0.txt", "sample_1.txt"]
    for p in a:
        data = p.read_bytes()
        assert data.startswith(b"The ") and len(data) == 44
        assert p.stat().st_mode & 0o777 == checkpoint.stat().st_mode & 0o777  # samples readable like checkpoints
        assert data == (tmp_path / "b" / p.name).read_bytes()
    recomputed = run(*args, "--prompt", "The ", "--no-kv-cache", "--out", str(tmp_path / "c"))
    assert recomputed.returncode == 0, recomputed.stderr[-3000:]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in sorted((tmp_path / "c").iterdir())]
    other = run(*args[:-1], "8", "--prompt", "The ")
    assert other.returncode == 0 and "--- sample 1 ---" in other.stdout
    assert a[0].read_bytes().decode("utf-8", "replace") not in other.stdout


def test_sample_continues_a_prompt_file_past_the_context(checkpoint, tmp_path):
    """150 tokens from a 64-token model: the window slides; the cache and recomputing give the same text."""
    (tmp_path / "prompt.txt").write_text("Once upon a time, ")
    args = ["sample.py", "--ckpt", str(checkpoint), "--prompt-file", str(tmp_path / "prompt.txt"), "--length", "150"]
    for out, extra in (("cached", []), ("recomputed", ["--no-kv-cache"])):
        result = run(*args, *extra, "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr[-3000:]
    cached = (tmp_path / "cached" / "sample_0.txt").read_bytes()
    assert cached.startswith(b"Once upon a time, ") and len(cached) == 18 + 150
    assert cached == (tmp_path / "recomputed" / "sample_0.txt").read_bytes()
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    line = one_error_line(run(*args[:4], str(tmp_path / "latin1.txt")))
    assert line == f"error: --prompt-file {tmp_path / 'latin1.txt'} is not UTF-8 text (byte 3); give a text file"
    both = one_error_line(run(*args, "--prompt", "x"))
    assert both == "error: give --prompt or --prompt-file, not both"


def test_main_builds_objects_without_training():
    cli = train.main(["--config", str(ROOT / "configs/tiny.yaml"), "--model.network.n_layers", "3"], run=False)
    assert len(cli.model.model.blocks) == 3
    assert cli.model.model.seq_len == cli.datamodule.seq_len == 64


@pytest.mark.parametrize(
    "override,message",
    [
        (["--model.network.n_layerz", "3"], "error: unrecognized arguments: --model.network.n_layerz 3"),
        (["--model.network.n_layer", "3"], "error: unrecognized arguments: --model.network.n_layer 3"),  # no prefixes
        (["--model.network.pattern.stride", "12"], "error: pattern stride=12 must be a positive multiple of block_size=8"),
        (["--data.path", "/nonexistent/enwik8"], "error: data file /nonexistent/enwik8 not found"),
    ],
)
def test_bad_input_fails_with_one_clear_line(override, message, tmp_path):
    result = run("train.py", "fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path), *override)
    assert one_error_line(result).startswith(message)


def test_bad_config_file_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  network:\n    n_layerz: 3\n")
    result = run("train.py", "fit", "--config", "configs/tiny.yaml", "--config", str(bad))
    assert one_error_line(result).startswith("error: Subcommand 'fit' does not accept option 'model.network.n_layerz'")


def test_sample_refuses_missing_or_corrupt_checkpoint(tmp_path):
    result = run("sample.py", "--ckpt", str(tmp_path / "none.ckpt"))
    assert result.returncode == 2 and result.stderr.strip() == f"error: checkpoint {tmp_path / 'none.ckpt'} not found"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    result = run("sample.py", "--ckpt", str(bad))
    assert result.returncode == 2 and "is not a readable checkpoint: truncated or not a checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_sample_refuses_a_checkpoint_whose_weights_do_not_fit_its_config(checkpoint, tmp_path):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["network"] = dataclasses.replace(state["hyper_parameters"]["network"], n_layers=3)  # weights: 2
    torch.save(state, tmp_path / "mismatched.ckpt")
    error = one_error_line(run("sample.py", "--ckpt", str(tmp_path / "mismatched.ckpt")))
    assert error.startswith(f"error: checkpoint {tmp_path / 'mismatched.ckpt'} does not match the model it describes (")
    assert "model.blocks.2" in error


def test_print_config_shows_the_resolved_options():
    result = run("train.py", "fit", "--config", "configs/tiny.yaml", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("    pattern:", "      kind: strided", "      stride: 16", "  class_path: sparse_transformer.data.ByteTextDataModule"):
        assert line in result.stdout.splitlines()
