"""Text positions: a 1-D table for a short context, factorized (rows, cols) beyond ``LONG_CONTEXT`` so a long
context costs about 2 sqrt(N) vectors instead of N, and 1-D at any length when the config asks for it."""

import math

import lightning as L
import torch
import yaml

import sample
import train
from commands import ROOT
from sparse_transformer.modality import Text
from sparse_transformer.model import AttentionPattern, ModelConfig
from sparse_transformer.model.config import LONG_CONTEXT, default_positions
from sparse_transformer.training.lightning_module import SparseTransformerLM

TINY = str(ROOT / "configs/tiny.yaml")
LONG = ["--data.init_args.seq_len", "16384", "--model.network.pattern.block_size", "64", "--model.network.pattern.stride", "128"]


def tables(cli) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in cli.model.model.pos.tables]


def test_long_text_gets_a_small_factorized_table_and_1d_only_when_asked():
    factorized = train.main(["--config", TINY, *LONG, "--trainer.logger", "false"], run=False)
    one_d = train.main(["--config", TINY, *LONG, "--model.network.positions", "[16384]", "--trainer.logger", "false"], run=False)
    d = factorized.model.model.config.d_model
    assert factorized.model.model.config.positions == (128, 128)  # a matrix as wide as the stride
    assert tables(factorized) == [(128, d), (128, d)] and tables(one_d) == [(16384, d)]
    assert one_d.model.model.num_params() - factorized.model.model.num_params() == (16384 - 256) * d


def test_a_short_context_keeps_its_1d_table():
    """The quickstart's weights are laid out as before: its checkpoints still load and resume."""
    cli = train.main(["--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.logger", "false"], run=False)
    assert cli.model.model.config.positions == (256,) and tables(cli) == [(256, 192)]
    assert default_positions(LONG_CONTEXT, 64) == (LONG_CONTEXT,) and len(default_positions(LONG_CONTEXT + 64, 64)) == 2


def test_any_long_context_factorizes_exactly_into_two_small_axes():
    """Every context is whole blocks: with blocks of 64, no axis is longer than N / 64, even when N / 64 is prime."""
    for n, stride in ((2**20, 1024), (3 * 2**20, 1536), (64 * 16411, 128), (64 * 193, 128), (2**24, None)):
        positions = default_positions(n, stride)
        assert len(positions) == 2 and math.prod(positions) == n and max(positions) <= n // 64, (n, positions)
    assert default_positions(2**24, None) == (4096, 4096)  # sqrt(N) without a stride
    pattern = AttentionPattern("strided", block_size=64)
    network = Text().resolve(ModelConfig(seq_len=2**20, d_model=512, n_heads=8, n_layers=1, pattern=pattern))
    assert network.pattern.stride == 1024 and network.positions == (1024, 1024)


def test_the_paper_enwik8_positions_are_the_default():
    network = yaml.safe_load((ROOT / "configs/enwik8.yaml").read_text())["model"]["network"]
    pattern = AttentionPattern(**network["pattern"])
    resolved = Text().resolve(ModelConfig(seq_len=12288, pattern=pattern, n_heads=network["n_heads"], d_model=network["d_model"]))
    assert resolved.positions == tuple(network["positions"]) == (96, 128)


def test_a_checkpoint_with_a_long_1d_table_still_loads(tmp_path):
    """A checkpoint carries its resolved positions: one saved before long text was factorized loads as it was."""
    network = ModelConfig(
        seq_len=16384,
        d_model=16,
        n_layers=1,
        n_heads=2,
        pattern=AttentionPattern("strided", block_size=64, stride=128),
        positions=(16384,),
    )
    lm = SparseTransformerLM(network)
    path = tmp_path / "old.ckpt"
    torch.save(
        {"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams), "pytorch-lightning_version": L.__version__}, path
    )
    loaded = sample.load_model(str(path), "cpu")
    assert loaded.model.config.positions == (16384,) and torch.equal(loaded.model.pos.tables[0], lm.model.pos.tables[0])
