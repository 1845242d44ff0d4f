"""Each variant is an overlay on tiny.yaml: it trains a few steps through the real CLI and samples from its
checkpoint; options a kind does not have, or rules it sets, are refused in one line."""

from pathlib import Path

import pytest
import torch

import train
from commands import ROOT, one_error_line, run
from sparse_transformer.model import AdaptiveSpan, Performer, Sparse

pytestmark = pytest.mark.slow

# overlay -> what the checkpoint's network must carry
VARIANTS = {
    "configs/variants/performer.yaml": lambda network: network.attention == Performer(features=64, redraw_every=4),
    "configs/variants/adaptive_span.yaml": lambda network: isinstance(network.attention, AdaptiveSpan),
    "configs/variants/all_attention.yaml": lambda network: network.attention == Sparse(persistent_memory=32),
    "configs/variants/hourglass.yaml": lambda network: network.hourglass.spec == "1@1 2@3 1@1" and network.n_layers == 4,
}


@pytest.mark.parametrize("overlay", VARIANTS)
def test_variant_trains_and_samples(overlay, tmp_path):
    result = run("train.py", "fit", "--config", "configs/tiny.yaml", "--config", overlay, "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert VARIANTS[overlay](state["hyper_parameters"]["network"])

    sample = run(
        "sample.py", "--ckpt", str(ckpt), "--length", "20", "--seed", "1", "--prompt", "The ", "--out", str(tmp_path / "s")
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    data = (tmp_path / "s" / "sample_0.txt").read_bytes()
    assert data.startswith(b"The ") and len(data) == 24


def test_overlays_compose_and_name_the_run_folder():
    configs = ["--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / "configs/variants/performer.yaml")]
    args = [*configs, "--trainer.logger", "false"]
    cli = train.main(args, run=False)
    assert isinstance(cli.model.model.config.attention, Performer) and cli.model.model.config.pattern.kind == "dense"
    assert cli.model.model.config.n_layers == 2  # the rest is tiny.yaml's
    assert Path(cli.trainer.default_root_dir) == Path("runs/tiny-performer")


def test_hourglass_from_the_command_line():
    args = ["--model.network.hourglass.spec", "1@1 1@2 1@1", "--model.network.n_layers", "3", "--print_config"]
    result = run("train.py", "fit", "--config", "configs/tiny.yaml", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "spec: 1@1 1@2 1@1" in result.stdout


@pytest.mark.parametrize(
    "override,message",
    [
        (
            ["--model.network.hourglass.spec", "1@1 1@2 1@1"],
            "error: n_layers=2 does not match the 3 layers of hourglass spec '1@1 1@2 1@1'; set n_layers to 3",
        ),
        (
            ["--model.network.hourglass.spec", "1@1 1@2", "--model.network.n_layers", "2"],
            "error: hourglass spec '1@1 1@2' must be an odd number",
        ),
        (
            ["--model.network.attention.persistent_memory", "4"],
            "error: persistent_memory=4 must be a multiple of pattern block_size=8",
        ),
        (
            ["--model.network.attention", "Performer"],
            "error: attention 'performer' is global causal linear attention; pattern.kind='strided'",
        ),
        (  # a kind without a backend has no backend option at all
            ["--model.network.attention", "AdaptiveSpan", "--model.network.attention.backend", "blocks"],
            "error: Option 'backend' is not accepted",
        ),
    ],
)
def test_bad_variant_options_fail_with_one_clear_line(override, message, tmp_path):
    result = run("train.py", "fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path), *override)
    assert one_error_line(result).startswith(message)
