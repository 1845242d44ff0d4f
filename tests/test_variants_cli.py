"""Each variant's tiny config trains a few steps through the real CLI and samples from its checkpoint."""

import pytest
import torch

from commands import one_error_line, run

pytestmark = pytest.mark.slow

# config -> (network option, the value the checkpoint must carry)
VARIANTS = {
    "configs/tiny_performer.yaml": ("attention", "performer"),
    "configs/tiny_adaptive_span.yaml": ("attention", "adaptive_span"),
    "configs/tiny_all_attention.yaml": ("persistent_memory", 8),
    "configs/tiny_hourglass.yaml": ("hourglass", {"spec": "1@1 2@3 1@1", "pooling": "linear", "upsampling": "linear"}),
}


@pytest.mark.parametrize("config", VARIANTS)
def test_variant_trains_and_samples(config, tmp_path):
    result = run("train.py", "fit", "--config", config, "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    key, value = VARIANTS[config]
    carried = state["hyper_parameters"]["network"][key]
    assert carried == value if not isinstance(value, dict) else value.items() <= dict(carried).items()

    sample = run(
        "sample.py", "--ckpt", str(ckpt), "--length", "20", "--seed", "1", "--prompt", "The ", "--out", str(tmp_path / "s")
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    data = (tmp_path / "s" / "sample_0.txt").read_bytes()
    assert data.startswith(b"The ") and len(data) == 24


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
        (["--model.network.persistent_memory", "4"], "error: persistent_memory=4 must be a multiple of pattern block_size=8"),
        (
            ["--model.network.attention", "performer"],
            "error: attention='performer' is global causal linear attention; pattern.kind='strided'",
        ),
        (
            ["--model.network.attention", "adaptive_span", "--model.network.persistent_memory", "8"],
            "error: persistent_memory=8 joins the block-sparse softmax; attention='adaptive_span' has none",
        ),
    ],
)
def test_bad_variant_options_fail_with_one_clear_line(override, message, tmp_path):
    result = run("train.py", "fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path), *override)
    assert one_error_line(result).startswith(message)
