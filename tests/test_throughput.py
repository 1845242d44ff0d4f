"""Tokens/s and model FLOPs: the FLOP count follows the layout's tiles, and the monitor logs through Lightning."""

import csv

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from sparse_transformer.data.text import ByteTextDataModule
from sparse_transformer.model import AttentionPattern, ModelConfig, Sparse, SparseTransformer
from sparse_transformer.training.lightning_module import SparseTransformerLM
from sparse_transformer.training.throughput import TokenThroughputMonitor


def test_flops_count_linear_layers_and_the_attended_tiles():
    d, n, b = 32, 64, 8
    dense = SparseTransformer(ModelConfig(seq_len=n, d_model=d, n_layers=1, n_heads=2, pattern=AttentionPattern("dense", block_size=b)))
    linear = 2 * (d * 3 * d + d * d + 2 * d * 4 * d + d * 256)  # qkv, proj, mlp, head
    keys = (n // b + 1) * b / 2  # block-causal: query block i computes i + 1 tiles, on average (nb + 1) / 2
    assert dense.flops_per_token(n) == linear + 2 * 2 * d * keys
    pattern = AttentionPattern("local", block_size=b, stride=b)
    local = SparseTransformer(ModelConfig(seq_len=n, d_model=d, n_layers=1, n_heads=2, pattern=pattern))
    assert local.flops_per_token(n) == linear + 2 * 2 * d * (2 * b * (n // b) - b) / (n // b)


def test_monitor_logs_tokens_per_second(tmp_path, one_thread):
    pattern = AttentionPattern("dense", block_size=8)
    module = SparseTransformerLM(ModelConfig(seq_len=16, d_model=16, n_layers=1, n_heads=2, pattern=pattern, attention=Sparse("blocks")))
    data = ByteTextDataModule(seq_len=16, batch_size=2, samples_per_epoch=12)
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        limit_val_batches=0,
        callbacks=[TokenThroughputMonitor(window_size=3)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train|device|items_per_sec"]]
    assert len(rows) == 4  # from the third batch on, when the window is full
    last = rows[-1]
    assert float(last["train|lengths"]) == 6 * 2 * 16  # tokens: 6 batches of 2 windows predicting 16 bytes
    tokens_per_s, samples_per_s = float(last["train|device|items_per_sec"]), float(last["train|device|samples_per_sec"])
    assert abs(tokens_per_s / samples_per_s - 16) < 1e-6
    flops_per_token = module.model.flops_per_token(16)
    assert abs(float(last["train|device|flops_per_sec"]) / tokens_per_s / (3 * flops_per_token) - 1) < 1e-6
