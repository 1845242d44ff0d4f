"""SIGTERM and SIGINT stop a run at every phase, with 128 + the signal's number (143, 130) and one line.

A cluster scheduler sends SIGTERM before it preempts a job (so does ``timeout``), and Ctrl-C sends SIGINT.
Lightning's own handling exits 0 on SIGTERM and 1 on SIGINT, saves nothing, and first runs a full validation,
which can outlast a scheduler's grace period. Here, by phase:

- start-up and the sanity check: no checkpoint is written yet (and in start-up, nothing at all: ``run_folder.py``),
  so the run stops at once;
- training: the handler only records the signal; at the end of the step in progress every rank agrees (one
  all-reduce, so a signal to any rank stops them all at the same step), ``last.ckpt`` is written and the run
  stops, skipping the validation that step would have started;
- validation: the same agreement after every validation batch; ``last.ckpt`` is written (the state of the
  step being validated; a resumed run goes on training from it, bit for bit as if never stopped, and does not
  repeat the cut validation) and the run stops;
- sampling at validation (``SampleLogger``): generation stops at the next token (:func:`received`), and the
  validation ends as above;
- the final save: it completes, then the run stops with the signal's status.

A second signal stops at once, whatever is running: a save in progress is abandoned with its temporary file,
so the last checkpoint written stays whole, and the line names it. This follows torchtitan, which also
checkpoints at the step boundary after a signal instead of inside the handler.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

import lightning as L
import torch

from sparse_transformer.errors import Interrupted
from sparse_transformer.training.checkpointing import RunCheckpoint

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received = 0  # the signal that asked this process to stop, 0: none (signals belong to the process)


def received() -> int:
    """The SIGTERM or SIGINT a run received (0: none); long work inside a run (sampling) checks it to end early."""
    return _received


def install(handler: Callable) -> dict[int, object]:
    """``handler`` for SIGTERM and SIGINT; returns the handlers it replaced (nothing off the main thread, where
    Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in SIGNALS}


def restore(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def stop_at_once(when: str) -> Callable[[int, object], None]:
    """A handler for where nothing needs saving (a run's start-up, before its callbacks are set up; sample.py,
    which writes its files whole at the end): it stops the command at once, ``when`` saying where it was."""

    def handler(signum: int, frame) -> None:
        raise Interrupted(f"{signal.Signals(signum).name} {when}; nothing was written", signum)

    return handler


class StopOnSignal(L.Callback):
    """Stops the run on SIGTERM or SIGINT as the module says, saving ``checkpoint``'s last.ckpt where there is
    training to keep."""

    def __init__(self, checkpoint: RunCheckpoint):
        self.checkpoint = checkpoint
        self.training = False  # from the first training step: a signal is acted on at the next boundary
        self.stopped: Interrupted | None = None  # what the CLI raises after fit, once every rank stopped
        self.pid = os.getpid()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        global _received
        _received = 0
        self.pid = os.getpid()
        install(self._receive)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        install(self._receive)  # Lightning installed its own SIGTERM handler since setup

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        install(self._receive)
        self.training = True

    def _receive(self, signum: int, frame) -> None:
        global _received
        if os.getpid() != self.pid:  # a DataLoader worker, forked with this handler: the run's process decides
            return
        name = signal.Signals(signum).name
        if _received:
            raise Interrupted(f"{name} again: stopped at once (last good checkpoint: {self.checkpoint.describe_good()})", signum)
        _received = signum
        if not self.training:
            raise Interrupted(f"{name} before training started; no checkpoint was written", signum)
        print(f"\n{name}: saving last.ckpt at the end of this step or validation batch, then stopping (again: stop at once)",
              file=sys.stderr)  # fmt: skip

    def _agreed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """The largest signal number any rank received: every rank stops at the same boundary."""
        if trainer.world_size > 1:
            return int(trainer.strategy.reduce(torch.tensor(_received, device=pl_module.device), reduce_op="max"))
        return _received

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        signum = self._agreed(trainer, pl_module)
        if signum and self.stopped is None:
            self.checkpoint.write_last(trainer)
            self._stop(trainer, signum, "")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.sanity_checking or not self.training:
            return
        signum = self._agreed(trainer, pl_module)
        if signum:
            self.checkpoint.write_last(trainer)
            self._stop(trainer, signum, " during validation")
            raise self.stopped

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.training:
            return
        signum = self._agreed(trainer, pl_module)  # a signal during sampling, or after the last batch
        if signum and self.stopped is None:
            self._stop(trainer, signum, " during validation")  # RunCheckpoint, called after every other callback, saves

    def _stop(self, trainer: L.Trainer, signum: int, when: str) -> None:
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning would validate once more before stopping
        name = signal.Signals(signum).name
        message = f"{name} at step {trainer.global_step}{when}; saved {self.checkpoint.run.last} (resume with --ckpt_path last)"
        self.stopped = Interrupted(message, signum, show=trainer.is_global_zero)

    def outcome(self) -> Interrupted | None:
        """After fit: the stop a signal caused, if any (a signal during the final save stops after it)."""
        if self.stopped is None and _received:
            name = signal.Signals(_received).name
            return Interrupted(f"{name} at the end of training; last good checkpoint: {self.checkpoint.describe_good()}", _received)
        return self.stopped
