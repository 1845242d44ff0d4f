"""Every shipped config parses and builds its model and data through the real CLI, without training."""

from pathlib import Path

import pytest

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


def test_the_paper_enwik8_setup():
    cli = train.main(["--config", str(CONFIGS[0].parent / "enwik8.yaml"), "--trainer.accelerator", "cpu"], run=False)
    hp, pattern = cli.model.hparams, cli.config.model.pattern
    assert (hp.n_layers, hp.d_model, hp.n_heads, cli.datamodule.seq_len) == (30, 512, 8, 12288)
    assert (pattern.kind, pattern.stride, pattern.summary, pattern.heads) == ("fixed", 128, 32, "merged")
