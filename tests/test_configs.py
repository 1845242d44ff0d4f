"""Every shipped config parses and builds its model, data and trainer through the real CLI, without training;
each says only what differs from the shared setup, and gets all of that setup. Overlays (variants, trainer
settings, docs) change only what they name."""

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import train
from sparse_transformer.model import Block
from sparse_transformer.training.checkpoint_io import AtomicCheckpointIO
from sparse_transformer.training.checkpointing import RunCheckpoint
from sparse_transformer.training.divergence_guard import DivergenceGuard
from sparse_transformer.training.progress import RunProgress, RunSummary
from sparse_transformer.training.run_folder import AttachLoggers
from sparse_transformer.training.sample_logger import SampleLogger
from sparse_transformer.training.signals import StopOnSignal
from sparse_transformer.training.throughput import TokenThroughputMonitor

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
OVERLAYS = sorted((ROOT / "configs" / "variants").glob("*.yaml"))
SHARED = (
    DivergenceGuard, StopOnSignal, RunCheckpoint, LearningRateMonitor, TokenThroughputMonitor, RunProgress, RunSummary,
    SampleLogger,
)  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(config):
    cli = train.main(["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.logger", "false"], run=False)
    model, data = cli.model, cli.datamodule
    assert model.model.seq_len == data.seq_len
    assert model.model.num_params() > 0
    assert sum(isinstance(m, Block) for m in model.model.modules()) == model.model.config.n_layers


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_gets_the_shared_setup_and_repeats_none_of_it(config):
    trainer_section = yaml.safe_load(config.read_text())["trainer"]
    if isinstance(trainer_section, str):  # the tiny configs: one trainer overlay
        assert trainer_section == "trainer/cpu.yaml"
        trainer_section = yaml.safe_load((ROOT / "configs" / trainer_section).read_text())
    assert not {"callbacks", "logger", "plugins", "default_root_dir"} & set(trainer_section), "the shared setup lives in training/cli.py"
    restated = {"gradient_clip_val": 1.0, "accelerator": "gpu", "precision": "bf16-mixed", "check_val_every_n_epoch": None}
    assert not [k for k, v in restated.items() if trainer_section.get(k, "unset") == v], "defaults and GPU settings live elsewhere"
    cli = train.main(["--config", str(config), "--trainer.accelerator", "cpu"], run=False)
    trainer, root = cli.trainer, Path("runs") / config.stem  # the run folder is named after the config
    assert [sum(isinstance(c, kind) for c in trainer.callbacks) for kind in SHARED] == [1] * len(SHARED)
    (checkpoint,) = [c for c in trainer.callbacks if isinstance(c, RunCheckpoint)]
    assert Path(checkpoint.dirpath) == (root / "checkpoints").resolve() and checkpoint.monitor == f"val_{cli.model.unit}"
    if "tiny" not in config.stem:  # what users run: last.ckpt on a schedule of its own, minutes apart
        assert checkpoint.last_every
    (attach,) = [c for c in trainer.callbacks if isinstance(c, AttachLoggers)]  # they join once the start checks pass
    assert trainer.loggers == [] and [type(lg) for lg in attach.loggers] == [TensorBoardLogger, CSVLogger]
    assert all(Path(lg.save_dir) == root for lg in attach.loggers)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_the_paper_enwik8_setup():
    cli = train.main(["--config", str(CONFIGS[0].parent / "enwik8.yaml"), "--trainer.accelerator", "cpu"], run=False)
    network = cli.model.model.config
    assert (network.n_layers, network.d_model, network.n_heads, cli.datamodule.seq_len) == (30, 512, 8, 12288)
    pattern = network.pattern
    assert (pattern.kind, pattern.stride, pattern.summary, pattern.heads) == ("fixed", 128, 32, "merged")


PAPER = {  # Child et al. (2019), section 7: layers, heads, d, dropout, stride, epochs; DataModule seq_len, positions
    "cifar10": (128, 2, 256, 0.25, 96, 120, 3072, (32, 32, 3)),
    "imagenet64": (48, 16, 512, 0.01, 128, 70, 12288, (64, 64, 3)),
    "audio": (48, 16, 512, 0.0, 256, None, 65536, (256, 256)),
}


@pytest.mark.parametrize("name", PAPER)
def test_the_paper_image_and_audio_setups(name):
    path = CONFIGS[0].parent / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    layers, heads, width, dropout, stride, epochs, seq_len, positions = PAPER[name]
    assert config["model"]["network"]["n_layers"] == layers
    assert config["model"]["warmup_steps"] == 5000 and config["trainer"].get("max_epochs") == epochs
    # One layer is enough to check what the data gives the model through the CLI: the stride of cifar10 and
    # every positional shape follow from the data.
    args = ["--config", str(path), "--trainer.accelerator", "cpu", "--model.network.n_layers", "1"]
    cli = train.main(args, run=False)
    lm, network = cli.model, cli.model.model.config
    assert (lm.hparams.weight_decay, cli.trainer.gradient_clip_val) == (0.01, 1.0)  # section 7, the defaults
    assert (network.n_heads, network.d_model, network.dropout, network.pattern.kind) == (heads, width, dropout, "strided")
    assert network.pattern.stride == stride and network.seq_len == seq_len and network.positions == positions
    assert lm.unit == "bpd"


LONG = {  # the paper's lengths on the quickstart's size: DataModule seq_len and batch, stride, positions, recompute
    "audio-long": (65536, 1, 2048, (32, 2048), True),  # stride sqrt(N) counted in blocks of 64: 32 blocks
    "imagenet64-long": (12288, 1, 192, (64, 64, 3), False),  # stride one row, from the data
}


@pytest.mark.parametrize("name", LONG)
def test_the_long_setups_are_the_papers_lengths_on_the_quickstarts_size(name):
    cli = train.main(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--trainer.logger", "false"], run=False)
    network, seq_len = cli.model.model.config, cli.datamodule.seq_len
    assert (network.n_layers, network.d_model, network.n_heads, network.pattern.block_size) == (4, 192, 6, 64)
    assert (seq_len, cli.datamodule.batch_size, network.pattern.stride, network.positions, network.recompute) == LONG[name]
    assert (network.pattern.kind, network.pattern.heads) == ("strided", "split")


def test_changing_the_data_moves_what_follows_from_it():
    tiny_images = ["--config", str(CONFIGS[0].parent / "cifar10-tiny.yaml"), "--trainer.accelerator", "cpu"]
    network = train.main([*tiny_images, "--data.init_args.image_size", "16"], run=False).model.model.config
    assert network.pattern.stride == 48 and network.positions == (16, 16, 3)  # one row of 16 RGB pixels
    audio = ["--config", str(CONFIGS[0].parent / "audio-tiny.yaml"), "--trainer.accelerator", "cpu"]
    network = train.main([*audio, "--data.init_args.seq_len", "512"], run=False).model.model.config
    assert network.positions == (32, 16)  # a matrix as wide as the stride


@pytest.mark.parametrize(
    "base,overlay,seq_len,stride,positions",
    [("cifar10-tiny", "photos", 768, 48, (16, 16, 3)), ("audio-tiny", "speech", 1024, 32, (32, 32))],
)
def test_the_docs_overlays_change_only_what_they_name(base, overlay, seq_len, stride, positions):
    """docs/make_figures.py trains a tiny config with an overlay of a few lines; what follows from the data follows."""
    configs = ["--config", str(ROOT / "configs" / f"{base}.yaml"), "--config", str(ROOT / "configs" / "docs" / f"{overlay}.yaml")]
    cli = train.main([*configs, "--trainer.logger", "false"], run=False)
    network = cli.model.model.config
    assert (network.seq_len, network.pattern.stride, tuple(network.positions)) == (seq_len, stride, positions)
    assert Path(cli.trainer.default_root_dir) == Path("runs") / f"{base}-{overlay}"
    assert len(yaml.safe_load((ROOT / "configs" / "docs" / f"{overlay}.yaml").read_text())["model"]["network"]) <= 5


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_variant_overlays_are_a_few_lines_and_apply_to_the_quickstart_too(overlay):
    lines = [line for line in overlay.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) <= 5
    for base in ("tiny", "quickstart"):
        configs = ["--config", str(ROOT / "configs" / f"{base}.yaml"), "--config", str(overlay)]
        cli = train.main([*configs, "--trainer.logger", "false"], run=False)
        assert Path(cli.trainer.default_root_dir) == Path("runs") / f"{base}-{overlay.stem}"


def test_the_trainer_overlays(capsys):
    gpu = ["--config", str(ROOT / "configs" / "enwik8.yaml"), "--trainer", str(ROOT / "configs" / "trainer" / "gpu.yaml")]
    with pytest.raises(SystemExit):
        train.main([*gpu, "--print_config"], run=False)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["accelerator"], trainer["precision"], trainer["max_epochs"]) == ("gpu", "bf16-mixed", 80)
    tiny = train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.logger", "false"], run=False).trainer
    assert (tiny.max_steps, tiny.val_check_interval, tiny.limit_val_batches) == (6, 3, 2)
    assert tiny.check_val_every_n_epoch is None  # an int val_check_interval counts steps of the run
