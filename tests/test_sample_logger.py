"""SampleLogger: every k-th validation writes samples as the modality wants them, and to TensorBoard."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sparse_transformer.errors import InputError
from sparse_transformer.modality import Image as ImageModality
from sparse_transformer.model import AttentionPattern, ModelConfig, Sparse
from sparse_transformer.training.lightning_module import SparseTransformerLM
from sparse_transformer.training.sample_logger import SampleLogger

PATTERN = AttentionPattern(kind="strided", block_size=8, stride=16, heads="split")


def make(tmp_path, modality=None) -> tuple[L.Trainer, SparseTransformerLM]:
    torch.manual_seed(0)
    network = ModelConfig(seq_len=48, d_model=16, n_layers=1, n_heads=2, pattern=PATTERN, attention=Sparse("blocks"))
    module = SparseTransformerLM(network, modality=modality)
    trainer = L.Trainer(
        default_root_dir=tmp_path, logger=TensorBoardLogger(tmp_path), accelerator="cpu", enable_progress_bar=False
    )
    return trainer, module


def test_text_samples_every_second_validation(tmp_path):
    trainer, module = make(tmp_path)
    logger = SampleLogger(every_n_val=2, num_samples=2, length=20)
    logger.on_validation_epoch_end(trainer, module)
    assert not list(tmp_path.rglob("sample_*.txt"))
    logger.on_validation_epoch_end(trainer, module)
    files = sorted((tmp_path / "samples" / "step=0").glob("sample_*.txt"))
    assert [f.name for f in files] == ["sample_0.txt", "sample_1.txt"]
    assert all(len(f.read_bytes()) == 21 and f.read_bytes().startswith(b"\n") for f in files)  # prompt + 20
    trainer.loggers[0].experiment.flush()
    assert "samples/0/text_summary" in EventAccumulator(str(trainer.log_dir)).Reload().Tags()["tensors"]


def test_image_samples_are_whole_images_and_leave_training_mode_alone(tmp_path):
    trainer, module = make(tmp_path, modality=ImageModality((4, 4, 3)))
    module.train()
    SampleLogger(num_samples=3).on_validation_epoch_end(trainer, module)
    assert module.training
    (grid,) = (tmp_path / "samples" / "step=0").glob("samples.png")
    assert Image.open(grid).size == (24 * (2 * 5 + 1), 24 * (2 * 5 + 1))  # 3 images of 4 x 4 in a 2 x 2 grid, scaled up


def test_a_length_the_model_cannot_take_is_refused_before_training(tmp_path):
    trainer, module = make(tmp_path, modality=ImageModality((4, 4, 3)))
    with pytest.raises(InputError, match="samples length=5: a sample of images is one whole window of 48 tokens"):
        SampleLogger(length=5).setup(trainer, module, "fit")
    SampleLogger(every_n_val=0).on_validation_epoch_end(trainer, module)  # 0: off
    assert not (tmp_path / "samples").exists()
