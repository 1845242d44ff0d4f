"""SampleLogger: samples generated during training, written to the run folder and to TensorBoard.

Every config has one (``samples:`` in a config sets its options)::

    samples:
      every_n_val: 5
      num_samples: 4
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from sparse_transformer.errors import InputError
from sparse_transformer.files import write_atomic
from sparse_transformer.sampling import sample


class SampleLogger(L.Callback):
    """Every ``every_n_val`` validation runs, generate a few samples as the model's modality writes them.

    Files go to ``<run folder>/samples/step=<step>/`` (text: .txt, images: a PNG grid, audio: .wav); a
    TensorBoard logger also gets them as text, image or audio. Sampling uses a fixed seed, so samples
    from successive validations differ only because the weights did.

    Args:
        every_n_val: validation runs between samples (the sanity check does not count); 0 turns it off.
        num_samples: samples per validation.
        length: tokens per text or audio sample, at most the context (default: one context); an image
            sample is one whole image.
        temperature, top_k: as in ``sample.py``.
        seed: the sampling generator's seed.
    """

    def __init__(
        self,
        every_n_val: int = 1,
        num_samples: int = 4,
        length: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if every_n_val < 0 or num_samples < 1:
            raise InputError(f"samples every_n_val={every_n_val} must be >= 0 and num_samples={num_samples} >= 1")
        self.every_n_val, self.num_samples, self.length = every_n_val, num_samples, length
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.validations = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.sample_length(pl_module)  # a length the model cannot take stops the run now, not at a validation

    def sample_length(self, pl_module: L.LightningModule) -> int:
        modality, seq_len = pl_module.modality, pl_module.model.seq_len
        requested = None if self.length is None else min(self.length, seq_len)
        return modality.sample_length(requested, seq_len, len(modality.first_tokens(None)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_val:
            return
        self.validations += 1
        if self.validations % self.every_n_val == 0:
            self.log_samples(trainer, pl_module)

    @rank_zero_only
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        modality, step = pl_module.modality, trainer.global_step
        was_training = pl_module.training
        generator = torch.Generator().manual_seed(self.seed)
        tokens = sample(pl_module.model, modality, self.num_samples, self.sample_length(pl_module), self.temperature, self.top_k, generator)
        pl_module.train(was_training)
        tokens = tokens.cpu()
        folder = Path(trainer.default_root_dir) / "samples" / f"step={step}"
        for name, data in modality.files(tokens).items():
            write_atomic(folder / name, data)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                modality.log(logger.experiment, tokens, step)
