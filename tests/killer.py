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


class SignalIn(L.Callback):
    """Sends ``signal`` to this process once, in ``phase``: ``setup`` (start-up), ``sanity`` (the sanity check's first
    batch), ``validation`` (the first batch of the validation after ``step``), ``sampling`` (as the validation after
    ``step`` ends, before SampleLogger samples), ``end`` (as training ends, before the final save); ``twice`` sends
    it a second time right after the first."""

    def __init__(self, phase: str, step: int = 0, signal: str = "SIGTERM", twice: bool = False):
        self.phase, self.step, self.signum, self.twice = phase, step, getattr(signal_module, signal), twice
        self.sent = False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            for _ in range(2 if self.twice else 1):
                os.kill(os.getpid(), self.signum)

    def setup(self, trainer, pl_module, stage) -> None:
        if self.phase == "setup":
            self._send()

    def on_validation_batch_start(self, trainer, pl_module, *args) -> None:
        if self.phase == "sanity" and trainer.sanity_checking:
            self._send()
        if self.phase == "validation" and not trainer.sanity_checking and trainer.global_step == self.step:
            self._send()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.phase == "sampling" and not trainer.sanity_checking and trainer.global_step == self.step:
            self._send()

    def on_train_batch_start(self, trainer, *args) -> None:
        if self.phase == "train" and trainer.global_step == self.step:
            self._send()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.phase == "end":
            self._send()


class NaNGradientAtStep(L.Callback):
    """One element of one gradient becomes NaN at ``step``: the loss stays finite, the update poisons the weights."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
