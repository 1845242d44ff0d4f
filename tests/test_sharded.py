"""Sharded training (FSDP2, configs/strategies/fsdp2.yaml) on 2 CPU processes over gloo, through the real CLI: the
numbers one process computes on the same global batch, checkpoints that resume bit for bit and that sample.py
reads; and the pieces that make it so (optimizer state matched by group, a tensor-parallel size refused)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commands import ROOT, run
from sparse_transformer.errors import InputError
from sparse_transformer.model import AdaptiveSpan, AttentionPattern, ModelConfig, SparseTransformer
from sparse_transformer.training.fsdp2 import by_name
from sparse_transformer.training.lightning_module import SparseTransformerLM, adamw_with_schedule
from sparse_transformer.training.resume import read_checkpoint

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=64, pattern=AttentionPattern("strided", block_size=8, stride=16))


def train(root: Path, devices: int, batch: int, *args: str) -> subprocess.CompletedProcess:
    """tiny.yaml for 4 steps, validated and checkpointed at steps 2 and 4 (every checkpoint kept), recording the first
    2 steps in ``<root>.pt``: sharded on ``devices`` processes, or on one process without the overlay."""
    command = [sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml"]
    command += ["--config", "configs/strategies/fsdp2.yaml", "--trainer.devices", str(devices)] if devices > 1 else []
    command += [
        "--data.batch_size", str(batch), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1", "--checkpoint.save_top_k", "-1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
        "--trainer.callbacks+=tests.recorder.RecordSteps", f"--trainer.callbacks.path={root}.pt", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A run sharded over 2 processes, 4 windows each per step."""
    root = tmp_path_factory.mktemp("sharded") / "run"
    result = train(root, devices=2, batch=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr
    return root


def assert_close(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], atol: float | None = None) -> None:
    """Every tensor within fp32 tolerance (by default, of its largest value): a factor of 2 anywhere fails."""
    assert theirs.keys() == ours.keys()
    for name, expected in theirs.items():
        tolerance = 1e-5 * expected.abs().max().item() + 1e-12 if atol is None else atol
        torch.testing.assert_close(ours[name], expected, rtol=1e-4, atol=tolerance, msg=lambda m, name=name: f"{name}: {m}")


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return torch.stack([t.norm() for t in tensors.values()]).norm().item()


@pytest.mark.slow
def test_two_sharded_processes_compute_what_one_process_computes_on_the_same_global_batch(sharded, tmp_path):
    """1 process x 8 windows against 2 sharded processes x 4 (the same 8: both take the sampler's one global order).
    Gradients averaged where they should be summed, or summed where averaged (gloo's AVG, pytorch#162338), are off
    by a factor of 2; clipping by each shard's norm instead of the whole gradient's leaves a global norm above 1."""
    one = tmp_path / "one"
    result = train(one, devices=1, batch=8)
    assert result.returncode == 0, result.stderr[-3000:]
    single, two = torch.load(f"{one}.pt"), torch.load(f"{sharded}.pt")
    lr = read_checkpoint(one / "checkpoints" / "last.ckpt")["hyper_parameters"]["lr"]
    for step, (expected, got) in enumerate(zip(single, two, strict=True)):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), step
        assert_close(expected["grad_before_clipping"], got["grad_before_clipping"])
        assert norm(expected["grad_before_clipping"]) > 1.0  # so the paper's clipping at norm 1.0 acts
        assert norm(got["grad"]) == pytest.approx(1.0, rel=1e-5) == norm(expected["grad"])
        assert_close(expected["grad"], got["grad"])
        # After the fused AdamW's update, which moves a weight by about lr whatever its gradient's size: where that
        # is near 0, fp32's differences in it are not small beside it. Within a thousandth of an update.
        assert_close(expected["param"], got["param"], atol=1e-3 * lr)
    optimizer = read_checkpoint(sharded / "checkpoints" / "last.ckpt")["optimizer_states"][0]
    assert all(group["fused"] for group in optimizer["param_groups"])  # the fused kernel takes the DTensor shards


@pytest.mark.slow
def test_a_sharded_run_resumes_bit_identically_and_samples_with_its_full_weights(sharded, tmp_path):
    (step2,) = (sharded / "checkpoints").glob("step=2-*.ckpt")
    resumed = tmp_path / "resumed"
    result = train(resumed, 2, 4, "--ckpt_path", str(step2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {step2} at step 2" in result.stderr
    expected, got = (read_checkpoint(run / "checkpoints" / "last.ckpt") for run in (sharded, resumed))
    assert got["global_step"] == expected["global_step"] == 4
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "ByteTextDataModule"):
        assert_equal(expected[key], got[key], key)
    # SampleLogger sampled at the run's second validation, every rank having gathered the full weights for it.
    assert sorted(p.name for p in (sharded / "samples" / "step=4").iterdir()) == ["sample_0.txt", "sample_1.txt"]


def assert_equal(expected, got, where: str) -> None:
    """Bit for bit, through nested dicts and lists."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, got), where
    elif isinstance(expected, dict):
        assert expected.keys() == got.keys(), where
        for key in expected:
            assert_equal(expected[key], got[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_equal(a, b, f"{where}.{i}")
    else:
        assert expected == got, where


@pytest.mark.slow
def test_sample_py_reads_a_sharded_runs_checkpoint(sharded):
    result = run("sample.py", "--ckpt", str(sharded / "checkpoints" / "last.ckpt"), "--length", "16", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--- sample 0 ---" in result.stdout


def test_optimizer_state_is_matched_to_parameters_group_by_group(one_thread):
    """AdamW's groups (matrices, then the rest) interleave in the model: numbered in ``model.parameters()`` order, as
    Lightning's own load numbers them, a moment would land on another parameter."""
    module = SparseTransformerLM(TINY)
    optimizer, _ = adamw_with_schedule(module.parameters(), 1e-3, (0.9, 0.95), 0.01, 1, 0.1, 10)
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    named = by_name(optimizer.state_dict(), optimizer, module)
    for name, p in module.named_parameters():
        assert torch.equal(named["state"][name]["exp_avg"], optimizer.state[p]["exp_avg"]), name
    assert [p for g in named["param_groups"] for p in g["params"]] == [
        name for g in optimizer.param_groups for p in g["params"] for name, q in module.named_parameters() if q is p
    ]
    by_position = dict(zip(range(len(list(module.parameters()))), (n for n, _ in module.named_parameters())))
    numbered = optimizer.state_dict()["state"]
    assert any(numbered[i]["exp_avg"].shape != named["state"][by_position[i]]["exp_avg"].shape for i in numbered)
    assert by_name(named, optimizer, module) is named  # keyed by name already


class Mesh:
    """A device mesh as ModelParallelStrategy gives it, of the given sizes (only what configure_model reads)."""

    def __init__(self, **sizes: int):
        self.sizes = sizes

    def __getitem__(self, name: str):
        return type("Dim", (), {"size": lambda _: self.sizes[name]})()


def test_a_tensor_parallel_size_above_one_is_refused_in_one_line():
    """Lightning's ModelParallelStrategy as it comes makes every device of a node tensor-parallel; this model has no
    plan for it, and its replicas would train without exchanging gradients."""
    module = SparseTransformerLM(TINY)
    module._device_mesh = Mesh(data_parallel=1, tensor_parallel=2)
    with pytest.raises(InputError, match=r"^trainer.strategy: a tensor-parallel size of 2, but this model has no"):
        module.configure_model()
    assert not any(type(m).__name__.startswith("FSDP") for m in module.modules())


def test_without_a_sharding_strategy_configure_model_leaves_the_model_as_it_is():
    module = SparseTransformerLM(TINY)
    module.configure_model()
    assert type(module.model) is SparseTransformer


def test_an_attention_that_reads_its_weights_outside_forward_is_refused_in_one_line():
    """Adaptive span's penalty and metrics read its span parameters after forward, when FSDP2 holds a shard of them."""
    module = SparseTransformerLM(dataclasses.replace(TINY, attention=AdaptiveSpan()))
    module._device_mesh = Mesh(data_parallel=2, tensor_parallel=1)
    with pytest.raises(InputError, match=r"^trainer.strategy: sharding cannot train adaptive_span attention, whose loss"):
        module.configure_model()
