"""What a run shows: a line about the model, a progress line, a line per validation and a summary at the end.

``RunProgress`` is the progress line, in steps of the run (not epochs: a run bounded by steps has no useful
epoch count, and an epoch's ETA is not the run's): step, tokens/s, training loss, last validation, time left.
It fits the terminal's width, and where stderr is not a terminal it prints plain lines ``every`` seconds. A step
that runs for minutes (N = 2^20 on a CPU) says within it what it is doing: its phase and block.
``RunSummary`` replaces Lightning's model table (whose FLOPs column reads 0 for a model without an example
input) with one line that counts FLOPs as the model does, and ends the run with one line: steps, best and
last validation, wall time and where the checkpoints are.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.utilities import rank_zero_info

from sparse_transformer.terminal import StatusLine, clock


class TrainingClock:
    """Tokens and seconds of training alone: the time of validation, sampling and start-up is left out, so
    tokens/s are the training step's rate. Keeps the last ``window`` batches for a current rate."""

    def __init__(self, window: int = 20):
        self.tokens, self.seconds = 0, 0.0
        self.recent: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, tokens) per batch
        self.since: float | None = None

    def resume(self) -> None:
        """Training (re)starts now: after start-up, or after a validation."""
        self.since = time.perf_counter()

    def batch(self, tokens: int) -> None:
        now = time.perf_counter()
        seconds = now - (self.since if self.since is not None else now)
        self.tokens, self.seconds, self.since = self.tokens + tokens, self.seconds + seconds, now
        self.recent.append((seconds, tokens))

    def rate(self) -> float:
        """Tokens per second over the last few batches."""
        seconds = sum(s for s, _ in self.recent)
        return sum(t for _, t in self.recent) / seconds if seconds > 0 else 0.0

    def steps_per_second(self) -> float:
        """Batches per second over the last few batches."""
        seconds = sum(s for s, _ in self.recent)
        return len(self.recent) / seconds if seconds > 0 else 0.0

    def mean_rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def batch_tokens(batch: Any, world_size: int) -> int:
    """Tokens predicted by one step on every device: a ``[B, N + 1]`` batch predicts ``B * N``."""
    if isinstance(batch, torch.Tensor) and batch.dim() == 2:
        return batch[:, 1:].numel() * world_size
    return 0


def total_steps(trainer: L.Trainer) -> int | None:
    """The run's last step: ``max_steps``, or what ``max_epochs`` comes to; None when unbounded."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    estimated = trainer.estimated_stepping_batches
    return int(estimated) if estimated != float("inf") else None


def metric(metrics: dict[str, Any], prefix: str) -> tuple[str, float] | None:
    """The first metric named ``<prefix>...`` (its per-step value, without Lightning's ``_step`` suffix)."""
    for name, value in metrics.items():
        if name.startswith(prefix) and not name.endswith("_epoch"):
            return name.removesuffix("_step"), float(value)
    return None


def rate_text(tokens_per_second: float) -> str:
    return f"{tokens_per_second:,.0f} tok/s"


class RunProgress(ProgressBar):
    """The run's progress on stderr: on a terminal, one line rewritten in place that fits its width::

        step 340/600 ━━━━━━━━━━  57%  10,412 tok/s  loss 2.912  val 2.953  1:02<0:48

    elsewhere (a job's log), the same as a plain line every ``every`` seconds. After each validation a line
    that stays: ``step 400/600  val_bpb 2.611  loss 2.647  10,380 tok/s  3:31``.

    Args:
        every: seconds between plain lines when stderr is not a terminal.
    """

    LONG_STEP = 5.0  # seconds into a step after which the line says what the step is doing

    def __init__(self, every: float = 30.0):
        super().__init__()
        self.every, self.enabled = every, True
        self.status: StatusLine | None = None
        self.clock = TrainingClock()
        self.started = time.perf_counter()
        self.total: int | None = None
        self.last_val: tuple[str, float] | None = None
        self.phase: str | None = None  # of the step in progress: forward, backward, optimizer step
        self.step_started = time.perf_counter()
        self.hooks: list = []

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.status = StatusLine(self.every)
        self.started = time.perf_counter()
        model = getattr(pl_module, "model", None)
        blocks = list(model.all_blocks()) if hasattr(model, "all_blocks") else []
        self.hooks = [block.register_forward_pre_hook(self._entering(i, len(blocks))) for i, block in enumerate(blocks)]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.phase, self.step_started = "forward", time.perf_counter()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.phase = "backward"

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.phase = "optimizer step"
        self._within_step("")

    def _entering(self, i: int, n: int):
        """A block's forward pre-hook (it runs again when recompute redoes the block in the backward): in a long
        step, the line says so; without recompute, a hook on the block's input says when its backward is done."""

        def hook(module: torch.nn.Module, args: tuple) -> None:
            if self.phase is None or not torch.is_grad_enabled() or time.perf_counter() - self.step_started < self.LONG_STEP:
                return
            self._within_step(f", block {i + 1} of {n}")
            x = args[0] if args else None
            if self.phase == "forward" and isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(lambda grad: self._within_step(f", block {i + 1} of {n} done"))

        return hook

    def _within_step(self, where: str) -> None:
        if not self.enabled or self.status is None or not self.status.due():
            return
        seconds = time.perf_counter() - self.step_started
        if seconds >= self.LONG_STEP:
            step = f"step {self.trainer.global_step + 1}" + (f"/{self.total}" if self.total else "")
            self.status.update(f"{step}: {self.phase}{where}", f"{clock(seconds)} into the step")

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.status is not None:
            self.status.clear()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total = total_steps(trainer)
        self.clock.resume()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.clock.batch(batch_tokens(batch, trainer.world_size))
        long_step = time.perf_counter() - self.step_started >= self.LONG_STEP
        self.phase = None
        if self.enabled and self.status is not None and (self.status.due() or long_step):
            self._show(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:  # fmt: skip
        if not self.enabled or self.status is None:
            return
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        total = batches[dataloader_idx]
        if batch_idx + 1 >= total:
            self.status.clear()  # what validation writes next (samples) starts on a clean line
        elif self.status.live:
            what = "sanity check" if trainer.sanity_checking else f"{self._step(trainer)} validating"
            self.status.update(f"{what} {batch_idx + 1}/{total}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.last_val = metric(trainer.callback_metrics, "val_")
        if self.enabled and self.status is not None and self.last_val is not None:
            name, value = self.last_val
            loss = metric(trainer.progress_bar_metrics, "train_")
            parts = [self._step(trainer), f"{name} {value:.3f}"]
            parts += [f"loss {loss[1]:.3f}"] if loss else []
            self.status.print("  ".join([*parts, rate_text(self.clock.rate()), clock(time.perf_counter() - self.started)]))
        self.clock.resume()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.status is not None:
            self.status.clear()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.status is not None:
            self.status.clear()  # the error line starts a line of its own

    def _step(self, trainer: L.Trainer) -> str:
        return f"step {trainer.global_step}" + (f"/{self.total}" if self.total else "")

    def _show(self, trainer: L.Trainer) -> None:
        step, rate = trainer.global_step, self.clock.rate()
        loss = metric(trainer.progress_bar_metrics, "train_")
        tail = [rate_text(rate)] if rate > 0 else []
        tail += [f"loss {loss[1]:.3f}"] if loss else []
        tail += [f"val {self.last_val[1]:.3f}"] if self.last_val else []
        elapsed = clock(time.perf_counter() - self.started)
        steps_per_second = self.clock.steps_per_second() / trainer.accumulate_grad_batches
        if self.total and steps_per_second > 0:
            left = clock((self.total - step) / steps_per_second)
            tail.append(f"{elapsed}<{left}" if self.status.live else f"{elapsed} elapsed, {left} left")
        else:
            tail.append(elapsed)
        fraction = step / self.total if self.total else None
        self.status.update(self._step(trainer), "  ".join(tail), fraction, force=True)


class RunSummary(ModelSummary):
    """One line about the model when fit starts, and one about the run when it ends.

    At the start: parameters, shape and the model's own FLOPs per token (``SparseTransformer.flops_per_token``,
    which counts every attention kind's real work); a LightningModule without a ``model.flops_per_token``
    gets Lightning's table. At the end: ``done: step 600/600 in 5:02 (10,371 tok/s); val_bpb 2.281, best 2.281;
    checkpoints in runs/quickstart/checkpoints: last.ckpt, step=600-val_bpb=2.281.ckpt``.

    Args:
        model_line: print the model's line (``trainer.enable_model_summary``).
    """

    def __init__(self, model_line: bool = True):
        super().__init__()
        self.model_line = model_line
        self.clock = TrainingClock()
        self.started = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()
        if not self.model_line:
            return
        model = getattr(pl_module, "model", None)
        if not hasattr(model, "flops_per_token"):
            super().on_fit_start(trainer, pl_module)
        elif trainer.is_global_zero:
            rank_zero_info(describe(model))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.resume()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.clock.batch(batch_tokens(batch, trainer.world_size))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.resume()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            rank_zero_info(self.summary(trainer))

    def summary(self, trainer: L.Trainer) -> str:
        total = total_steps(trainer)
        line = f"done: step {trainer.global_step}" + (f"/{total}" if total else "")
        line += f" in {clock(time.perf_counter() - self.started)}"
        line += f" ({rate_text(self.clock.mean_rate())} training)" if self.clock.tokens else ""
        last = metric(trainer.callback_metrics, "val_")
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_score", None)
        if last is not None:
            line += f"; {last[0]} {last[1]:.3f}" + (f", best {float(best):.3f}" if best is not None else "")
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            folder = Path(checkpoint.dirpath)
            files = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
            line += f"; checkpoints in {folder}" + (f": {', '.join(files)}" if files else "")
        return line


def describe(model: Any) -> str:
    """``model: 1.92M parameters, 4 layers, d_model 192, 6 heads, strided sparse attention, context 256,
    2.9 MFLOP/token forward``."""
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    attention = getattr(config.attention, "name", type(config.attention).__name__)
    return (
        f"model: {_si(parameters)} parameters, {config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, "
        f"{config.pattern.kind} {attention} attention, context {model.seq_len}, {_si(model.flops_per_token(), ' ')}FLOP/token forward"
    )


def _si(n: float, space: str = "") -> str:
    """``1_920_000`` -> ``1.92M``; with ``space=" "``, ``2.9 M`` (for ``2.9 MFLOP``)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= factor:
            return f"{n / factor:.3g}{space}{prefix}"
    return f"{n:.3g}{space}"
