"""SIGTERM and SIGINT stop a run cleanly: ``last.ckpt`` at the next step boundary, then a non-zero exit naming it.

A cluster scheduler sends SIGTERM before it preempts a job (so does ``timeout``), and Ctrl-C sends SIGINT.
Lightning's own handling exits 0 on SIGTERM and 1 on SIGINT without saving, so everything since the last
checkpoint is lost and a shell chain (``train.py ... && sample.py ...``) takes the preemption for success.
Here the handler only records the signal; at the end of the step in progress every rank agrees to stop
(one all-reduce, so a signal to any rank stops them all at the same step), ``last.ckpt`` is written, and the
CLI exits with 128 + the signal's number. A second Ctrl-C stops at once, without saving. This follows
torchtitan, which also checkpoints at the step boundary after a signal instead of inside the handler.
"""

from __future__ import annotations

import signal
import sys
import threading

import lightning as L
import torch

from sparse_transformer.errors import Interrupted
from sparse_transformer.training.checkpointing import RunCheckpoint

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(L.Callback):
    """Records SIGTERM and SIGINT during training and stops at the next step boundary after saving ``checkpoint``'s
    last.ckpt."""

    def __init__(self, checkpoint: RunCheckpoint):
        self.checkpoint = checkpoint
        self.received = 0  # the signal's number on this rank; 0: none
        self.stopped: Interrupted | None = None  # what the CLI raises after fit, once every rank stopped
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its own SIGTERM handler just before training; this one replaces it for training.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._receive) for s in SIGNALS}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _receive(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: saving last.ckpt at the end of this step, then stopping (Ctrl-C again: stop now)", file=sys.stderr)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        signum = self.received
        if trainer.world_size > 1:  # the largest signal number any rank received: all stop, at this step
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max"))
        if not signum or self.stopped is not None:
            return
        self.checkpoint.write_last(trainer)
        trainer.should_stop = True
        name = signal.Signals(signum).name
        message = f"{name} at step {trainer.global_step}; saved {self.checkpoint.run.last} (resume with --ckpt_path last)"
        self.stopped = Interrupted(message, signum, show=trainer.is_global_zero)
