"""Callbacks for crash tests: the training process kills or signals itself before a given step."""

import os
import signal
import signal as signal_module

import lightning as L
import torch


class KillAtStep(L.Callback):
    """Dies like a preempted job: no exception handlers, no teardown, no flushed logs."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(L.Callback):
    """Sends ``signal`` to this process before ``step`` (on ``rank`` only), as a scheduler or Ctrl-C would."""

    def __init__(self, step: int, signal: str = "SIGTERM", rank: int = 0):
        self.step, self.signum, self.rank = step, getattr(signal_module, signal), rank

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class NoBetterValidation(L.Callback):
    """After the first validation, the checkpoints' best score becomes unbeatable: no later validation is ever
    the best, as when a run's validation stops improving."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        unbeatable = torch.tensor(float("-inf"))
        for checkpoint in trainer.checkpoint_callbacks:
            checkpoint.best_k_models = dict.fromkeys(checkpoint.best_k_models, unbeatable)
            if checkpoint.best_k_models:
                checkpoint.kth_value = checkpoint.best_model_score = unbeatable
