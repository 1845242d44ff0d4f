"""Every shipped config parses and builds its model and data through the real CLI, without training."""

from pathlib import Path

import pytest
import yaml

import train
from sparse_transformer.model import Block

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(config):
    cli = train.main(["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.logger", "false"], run=False)
    model, data = cli.model, cli.datamodule
    assert model.hparams.seq_len == data.seq_len
    assert model.model.num_params() > 0
    assert sum(isinstance(m, Block) for m in model.model.modules()) == model.hparams.n_layers


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_guards_checkpoints_and_measures(config):
    trainer = yaml.safe_load(config.read_text())["trainer"]
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {}) for c in trainer["callbacks"]}
    for name in ("NonFiniteLossGuard", "ModelCheckpoint", "LearningRateMonitor", "TokenThroughputMonitor"):
        assert name in callbacks, f"{config.name} lacks {name}"
    assert [p["class_path"].rsplit(".", 1)[1] for p in trainer["plugins"]] == ["AtomicCheckpointIO"]
    cli = train.main(["--config", str(config), "--trainer.accelerator", "cpu"], run=False)
    assert callbacks["ModelCheckpoint"]["save_last"] and callbacks["ModelCheckpoint"]["monitor"] == f"val_{cli.model.unit}"
    if "tiny" not in config.stem:  # what users run: a fixed checkpoint folder for --ckpt_path last, both loggers
        assert callbacks["ModelCheckpoint"]["dirpath"] == f"{trainer['default_root_dir']}/checkpoints"
        assert "RichProgressBar" in callbacks
        loggers = {lg["class_path"].rsplit(".", 1)[1] for lg in trainer["logger"]}
        assert loggers == {"TensorBoardLogger", "CSVLogger"}


def test_the_paper_enwik8_setup():
    cli = train.main(["--config", str(CONFIGS[0].parent / "enwik8.yaml"), "--trainer.accelerator", "cpu"], run=False)
    hp, pattern = cli.model.hparams, cli.config.model.pattern
    assert (hp.n_layers, hp.d_model, hp.n_heads, cli.datamodule.seq_len) == (30, 512, 8, 12288)
    assert (pattern.kind, pattern.stride, pattern.summary, pattern.heads) == ("fixed", 128, 32, "merged")


PAPER = {  # Child et al. (2019), section 7: layers, heads, d, dropout, stride, epochs; DataModule seq_len, positions
    "cifar10": (128, 2, 256, 0.25, 96, 120, 3072, [32, 32, 3]),
    "imagenet64": (48, 16, 512, 0.01, 128, 70, 12288, [64, 64, 3]),
    "audio": (48, 16, 512, 0.0, 256, None, 65536, [256, 256]),
}


@pytest.mark.parametrize("name", PAPER)
def test_the_paper_image_and_audio_setups(name):
    config = yaml.safe_load((CONFIGS[0].parent / f"{name}.yaml").read_text())
    layers, heads, width, dropout, stride, epochs, seq_len, positions = PAPER[name]
    model = config["model"]
    assert (model["n_layers"], model["n_heads"], model["d_model"], model["dropout"]) == (layers, heads, width, dropout)
    assert (model["pattern"]["kind"], model["pattern"]["stride"]) == ("strided", stride)
    assert (model["warmup_steps"], model["weight_decay"], config["trainer"]["gradient_clip_val"]) == (5000, 0.01, 1.0)
    assert config["trainer"].get("max_epochs") == epochs
    # One layer is enough to check what the DataModule gives the model through the CLI.
    args = ["--config", str(CONFIGS[0].parent / f"{name}.yaml"), "--trainer.accelerator", "cpu", "--model.n_layers", "1"]
    lm = train.main(args, run=False).model
    assert lm.hparams.seq_len == seq_len and list(lm.model.pos.shape) == positions
    assert lm.unit == "bpd"
