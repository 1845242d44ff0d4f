"""SampleLogger: samples written during training, to the log directory and TensorBoard.

Configured in YAML under ``trainer.callbacks``::

    - class_path: sparse_transformer.sample_logger.SampleLogger
      init_args: {every_n_val: 5, num_samples: 4}
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from sparse_transformer.atomic import write_atomic
from sparse_transformer.modality import bytes_to_images, image_grid, mu_law_decode, samples_to_files
from sparse_transformer.sampling import sample_modality


class SampleLogger(L.Callback):
    """Every ``every_n_val`` validation runs, generate a few samples as the model's modality writes them.

    Files go to ``<log_dir>/samples/step=<step>/`` (text: .txt, images: a PNG grid, audio: .wav); a
    TensorBoard logger also gets them as text, image or audio. Sampling uses a fixed seed, so samples
    from successive validations differ only because the weights did.

    Args:
        every_n_val: validation runs between samples (the sanity check does not count).
        num_samples: samples per validation.
        length: tokens per text or audio sample (default 256 for text, the whole context for audio);
            an image sample is always one whole image.
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
        if every_n_val < 1 or num_samples < 1:
            raise ValueError(f"SampleLogger every_n_val={every_n_val} and num_samples={num_samples} must be >= 1")
        self.every_n_val, self.num_samples, self.length = every_n_val, num_samples, length
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.validations = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_val == 0:
            self.log_samples(trainer, pl_module)

    @rank_zero_only
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        modality, seq_len = pl_module.modality, pl_module.hparams.seq_len
        kind, step = modality["kind"], trainer.global_step
        if kind == "image":
            length = seq_len
        else:
            length = min(self.length or (256 if kind == "text" else seq_len), seq_len)
        was_training = pl_module.training
        generator = torch.Generator().manual_seed(self.seed)
        tokens = sample_modality(pl_module.model, modality, self.num_samples, length, self.temperature, self.top_k, generator)
        pl_module.train(was_training)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step={step}"
        for name, data in samples_to_files(tokens.cpu(), modality).items():
            write_atomic(folder / name, data)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                self._to_tensorboard(logger.experiment, tokens.cpu(), modality, step)

    @staticmethod
    def _to_tensorboard(writer, tokens: torch.Tensor, modality, step: int) -> None:
        if modality["kind"] == "image":
            writer.add_image("samples", image_grid(bytes_to_images(tokens, modality["shape"])), step)
        elif modality["kind"] == "audio":
            for i, row in enumerate(tokens):
                writer.add_audio(f"samples/{i}", mu_law_decode(row)[None], step, sample_rate=modality["sample_rate"])
        else:
            for i, row in enumerate(tokens):
                text = bytes(row.tolist()).decode("utf-8", errors="replace")
                writer.add_text(f"samples/{i}", f"```\n{text}\n```", step)
