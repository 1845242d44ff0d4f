"""SampleLogger: samples generated during training, written to the run folder and to TensorBoard.

Every config has one (``samples:`` in a config sets its options)::

    samples:
      every_n_val: 5
      num_samples: 4
      length: 1000
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from sparse_transformer.errors import InputError
from sparse_transformer.files import write_atomic
from sparse_transformer.sampling import NonFiniteLogits, Sampling, sample
from sparse_transformer.training import signals
from sparse_transformer.training.finite import first_non_finite
from sparse_transformer.training.fsdp2 import full_weights

PREVIEW_TOKENS = 256  # the default length of a text sample at validation: a paragraph to read


class SampleLogger(L.Callback):
    """Every ``every_n_val`` validation runs, generate a few samples as the model's modality writes them.

    Files go to ``<run folder>/samples/step=<step>/`` (text: .txt, images: a PNG grid, audio: .wav); a
    TensorBoard logger also gets them as text, image or audio. Sampling uses a fixed seed, so samples
    from successive validations differ only because the weights did.

    The defaults keep sampling a small part of a run: on the quickstart (600 steps, 3 validations) 2 samples of
    256 tokens took 1.4-3.3% of the run's time in three runs on a busy 2-core CPU (``bench/validation_samples.py``). Decoding
    is one token at a time, so the cost grows with the length far more than with the count: a config with a
    long context asks for longer samples explicitly (``samples.length``), or for fewer (``every_n_val``).

    Args:
        every_n_val: validation runs between samples (the sanity check does not count); 0 turns it off.
        num_samples: samples per validation.
        length: tokens per text or audio sample, any number (default: the rest of one context, at most
            ``PREVIEW_TOKENS`` bytes of text, or one second of audio); an image sample is one whole image.
        temperature, top_k: as in ``sample.py``.
        seed: the sampling generator's seed.
    """

    def __init__(
        self,
        every_n_val: int = 1,
        num_samples: int = 2,
        length: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if every_n_val < 0 or num_samples < 1:
            raise InputError(f"samples every_n_val={every_n_val} must be >= 0 and num_samples={num_samples} >= 1")
        if length is not None and length < 1:
            raise InputError(f"samples length={length} must be >= 1 token")
        self.every_n_val, self.num_samples, self.length = every_n_val, num_samples, length
        self.sampling = Sampling(temperature, top_k, seed)  # a bad temperature or top-k: refused now, not at a validation
        self.validations = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.sample_length(pl_module)  # a length the model cannot take stops the run now, not at a validation

    def sample_length(self, pl_module: L.LightningModule) -> int:
        modality, seq_len = pl_module.modality, pl_module.model.seq_len
        if self.length is None:
            full = modality.default_length(seq_len, len(modality.prompt()))
            if "seconds" in modality.options:  # audio: a second is enough to hear, a 65,536-step context is not cheap
                return min(full, modality.sample_rate)
            return min(full, PREVIEW_TOKENS) if "length" in modality.options else full
        if "length" not in modality.options and self.length != seq_len:
            raise InputError(f"samples length={self.length}: a sample of {modality.noun} is one whole window of {seq_len} tokens")
        return self.length

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_val:
            return
        self.validations += 1
        if self.validations % self.every_n_val == 0:
            with full_weights(pl_module):  # sharded weights (fsdp2.py) gathered on every rank, for rank 0 to sample
                self.log_samples(trainer, pl_module)

    @rank_zero_only
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        modality, step, length = pl_module.modality, trainer.global_step, self.sample_length(pl_module)
        was_training = pl_module.training
        started = time.perf_counter()
        tokens = self.generate(pl_module, step, length)
        seconds = time.perf_counter() - started
        pl_module.train(was_training)
        if tokens is None:
            return
        tokens = tokens.cpu()
        folder = Path(trainer.default_root_dir) / "samples" / f"step={step}"
        for name, data in modality.files(tokens).items():
            write_atomic(folder / name, data)
        for logger in trainer.loggers:
            logger.log_metrics({"samples/seconds": seconds}, step)
            if isinstance(logger, TensorBoardLogger):
                modality.log(logger.experiment, tokens, step)
        rate = self.num_samples * length / seconds
        rank_zero_info(f"samples at step {step}: {self.num_samples} x {length} tokens in {seconds:.1f} s ({rate:,.0f} tokens/s), {folder}")

    def generate(self, pl_module: L.LightningModule, step: int, length: int) -> torch.Tensor | None:
        """The samples, or None where a bad model or a stop makes them pointless: weights that are not finite (the
        divergence guard or the checkpoint writer stops the run in one line next), outputs that are not, or a
        SIGTERM / SIGINT during generation (the run stops at the end of this validation, ``signals.py``)."""
        bad = first_non_finite(pl_module.named_parameters())
        if bad is not None:
            rank_zero_warn(f"no samples at step {step}: {bad[0]} holds {bad[1]}")
            return None
        try:
            return sample(pl_module.model, pl_module.modality, self.num_samples, length, self.sampling, progress=_stop_on_signal)
        except NonFiniteLogits as e:
            rank_zero_warn(f"no samples at step {step}: {e}")
        except _Stopped:
            pass
        return None


class _Stopped(Exception):
    """A signal arrived during sampling."""


def _stop_on_signal(done: int) -> None:
    if signals.received():
        raise _Stopped
