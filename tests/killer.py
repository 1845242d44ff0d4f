"""A callback for crash tests: the training process kills itself with SIGKILL (kill -9) before a given step."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """Dies like a preempted job: no exception handlers, no teardown, no flushed logs."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
