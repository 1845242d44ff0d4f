"""Adding an attention kind is one file: a toy kind defined here, outside the library, trains through the real
CLI and samples from its checkpoint with no library edit."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import sample
import train
from sparse_transformer.model import ModelConfig
from sparse_transformer.model.attention import Attention
from sparse_transformer.model.config import AttentionKind, ConfigError

ROOT = Path(__file__).resolve().parents[1]


class CausalMeanAttention(Attention):
    """Each position gets the mean of the values up to it: attention with equal weights, no scores."""

    def attend(self, q, k, v, cache):
        n = v.shape[2]
        return v.cumsum(2) / torch.arange(1, n + 1, device=v.device, dtype=v.dtype)[:, None]  # (B, H, N, D)

    def attention_flops(self, n: int) -> float:
        return 0.0  # additions only


@dataclass(frozen=True)
class CausalMean(AttentionKind):
    """A toy kind: ``attention: {class_path: test_new_kind.CausalMean}``; it refuses patterns it would ignore."""

    name: ClassVar[str] = "causal_mean"

    def check(self, config: ModelConfig) -> None:
        if config.pattern.kind != "dense":
            raise ConfigError(f"attention 'causal_mean' sees every earlier position; pattern.kind={config.pattern.kind!r} cannot apply")

    def build(self, config: ModelConfig, seq_len: int, layer: int) -> CausalMeanAttention:
        return CausalMeanAttention(config)


@pytest.mark.slow
def test_a_kind_defined_outside_the_library_trains_and_samples(tmp_path, capsys):
    args = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    kind = ["--model.network.attention", "test_new_kind.CausalMean", "--model.network.pattern.kind", "dense"]
    cli = train.main([*args, *kind])
    assert cli.trainer.global_step == 6 and isinstance(cli.model.model.blocks[0].attn, CausalMeanAttention)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["network"].attention == CausalMean()
    (text,) = sample.main(["--ckpt", str(ckpt), "--prompt", "The ", "--length", "10"])
    assert text.startswith(b"The ") and len(text) == 14


def test_its_own_rules_are_checked_when_the_config_is_read():
    with pytest.raises(ConfigError, match="attention 'causal_mean' sees every earlier position; pattern.kind='strided'"):
        train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.network.attention", "test_new_kind.CausalMean"], run=False)
