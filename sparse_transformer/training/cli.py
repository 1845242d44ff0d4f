"""The command line behind ``train.py``: LightningCLI with the training setup every config shares.

Shared here, in one place, so configs say only what differs:

- trainer defaults (gradient clipping at 1.0 as in the paper, atomic checkpoint writes, the run folder); an
  int ``val_check_interval`` counts training steps of the run, across epochs;
- callbacks on every run: checkpoints, the divergence guard, a clean stop on SIGTERM / SIGINT, tokens/s and
  MFU, the learning rate, a progress line and a summary line (``progress.py``);
- TensorBoard and CSV loggers in the run folder (``--trainer.logger false`` turns them off);
- ``checkpoint:`` (``CheckpointSchedule``) and ``samples:`` (``SampleLogger``), configurable per config;
- links from the data to the model: the context and the modality.

The run (``run.py``: its folder, the checkpoint it resumes from, its seed) is made once from the command line
and passed to the callbacks that need it and to ``fit``; its folder is checked and locked first, and written
only once every start check passed (``run_folder.py``; a trainer that would train nothing or never end is
refused among them). In a run of several processes a failure on any of them ends all of them at once
(``distributed.py``). SIGTERM and SIGINT stop it at any phase (``signals.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.callbacks import LearningRateMonitor, Timer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from sparse_transformer import allocator
from sparse_transformer.errors import InputError, input_error, one_line
from sparse_transformer.files import check_folder, reason, write_atomic
from sparse_transformer.model.kernels import get_backend, resolve_backend
from sparse_transformer.model.kernels.selfcheck import try_backend
from sparse_transformer.training.checkpointing import CheckpointSchedule, RunCheckpoint
from sparse_transformer.training import signals
from sparse_transformer.training.distributed import (
    FailureWatch,
    launched_as_rank_zero,
    lost_peer,
    port_taken,
    start_once_launched,
    watch_from_environment,
)
from sparse_transformer.training import memory
from sparse_transformer.training.divergence_guard import DivergenceGuard
from sparse_transformer.training.fsdp2 import FSDP2Strategy
from sparse_transformer.training.lightning_module import SparseTransformerLM
from sparse_transformer.terminal import quiet_third_party
from sparse_transformer.training.progress import RunProgress, RunSummary
from sparse_transformer.training.run import Run, folder_for
from sparse_transformer.training.run_folder import AttachLoggers, RunLock
from sparse_transformer.training.sample_logger import SampleLogger
from sparse_transformer.training.signals import StopOnSignal
from sparse_transformer.training.throughput import TokenThroughputMonitor

PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}  # else fp32
DESCRIPTION = """Train a Sparse Transformer: train.py fit --config configs/quickstart.yaml. Configs compose:
--config configs/tiny.yaml --config configs/variants/performer.yaml. The run's folder (checkpoints,
TensorBoard, CSV, samples) is --trainer.default_root_dir, by default runs/<config names>. Every run gets
the callbacks and loggers of sparse_transformer/training/cli.py besides any a config adds: --print_config
shows `logger: true` (TensorBoard and CSV in the run folder) and `callbacks: null` (none added)."""

TRAINER_DEFAULTS: dict[str, Any] = {
    "gradient_clip_val": 1.0,  # section 7: every setup clips the gradient norm at 1.0
    "logger": True,  # TensorBoard and CSV in the run folder, made in instantiate_trainer once the folder is known
    "log_every_n_steps": 10,
    "plugins": [{"class_path": "sparse_transformer.training.checkpoint_io.AtomicCheckpointIO"}],
}


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad option or config value in one line instead of the full usage text, and takes no
    abbreviations (``--model.network.n_layer`` is an error, not ``n_layers``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse probing alternatives: it catches this
            super().error(message, ex)
        # A bad value inside a class_path (data: ...) arrives wrapped in every alternative the parser tried;
        # the innermost argparse.ArgumentError in the chain of causes names the key and the value.
        causes = [ex]
        while causes[-1] is not None and causes[-1] not in causes[:-1]:
            causes.append(causes[-1].__cause__ or causes[-1].__context__)
        innermost = next((e for e in reversed(causes) if isinstance(e, argparse.ArgumentError)), None)
        message = innermost.message if innermost is not None else message
        print(f"error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        sys.exit(2)


class SaveRunConfig(SaveConfigCallback):
    """The resolved config as ``<run folder>/config.yaml``, rewritten by each start of the run."""

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any):
        super().__init__(parser, config, save_to_log_dir=False)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":  # a fit writes it once its start checks passed (run_folder.py)
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().setup(trainer, pl_module, "fit")

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        path = Path(trainer.default_root_dir) / "config.yaml"
        try:
            write_atomic(path, self.parser.dump(self.config, skip_none=False))
        except OSError as e:  # the disk filled since the folder was checked
            raise InputError(f"{path} cannot be written: {reason(e)}") from e


class SparseTransformerCLI(LightningCLI):
    """``LightningCLI(SparseTransformerLM, <any DataModule>)`` with the shared setup above."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        torch.set_float32_matmul_precision("high")
        quiet_third_party()
        self.run: Run | None = None
        self.lock: RunLock | None = None
        self.stop_on_signal: StopOnSignal | None = None
        self.watch: FailureWatch | None = None
        previous = signals.install(signals.stop_at_once("during start-up"))
        try:
            super().__init__(
                SparseTransformerLM,
                L.LightningDataModule,
                subclass_mode_data=True,
                parser_class=OneLineErrorParser,
                parser_kwargs={"description": DESCRIPTION},
                trainer_defaults=TRAINER_DEFAULTS,
                save_config_callback=SaveRunConfig,
                auto_configure_optimizers=False,  # the LightningModule configures AdamW and its schedule
                args=args,
                run=run,
            )
        except Exception as e:
            self._tell_the_other_ranks(e)
            raise
        finally:
            if self.lock is not None:
                self.lock.release()
            signals.restore(previous)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (the model has no predict step, so no ``predict``, whose parser took a quarter of
        every ``--help``)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.seq_len", "model.network.seq_len", apply_on="instantiate")
        parser.link_arguments("data.modality", "model.modality", apply_on="instantiate")
        parser.add_class_arguments(CheckpointSchedule, "checkpoint")
        parser.add_lightning_class_args(SampleLogger, "samples")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Make the run from the command line. Its checkpoint is taken out of what LightningCLI sees: LightningCLI
        would load the checkpoint's hyperparameters over the configured model, so a resumed run would silently
        ignore changed options; the checkpoint callback checks the checkpoint against the config instead, and
        :meth:`fit` resumes from it."""
        super().parse_arguments(parser, args)
        section = self.config.get(self.config.get("subcommand") or "", self.config)
        if section.trainer.default_root_dir is None:
            section.trainer.default_root_dir = str(folder_for(section.get("config") or []))
        if self.config.get("subcommand") in ("validate", "test"):  # they write config.yaml and metrics there too
            check_folder(section.trainer.default_root_dir, "run folder")
        if self.config.get("subcommand") == "fit":
            fit = self.config.fit
            if launched_as_rank_zero():  # before anything reads the folder: a live run in it is named first
                self.lock = RunLock(fit.trainer.default_root_dir).acquire()
            # the seed as configured, before LightningCLI draws a random one for True
            self.run = Run.start(fit.trainer.default_root_dir, fit.ckpt_path, fit.seed_everything)
            fit.ckpt_path = None

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The shared loggers and callbacks in the run folder; Lightning's refusal of a setting is a bad config."""
        section = self.config_init[self.subcommand] if self.subcommand else self.config_init
        config = section["trainer"]
        root = Path(config["default_root_dir"])
        callbacks: list[L.Callback] = []
        if config.get("logger") in (None, True):  # ours join the trainer once the start checks passed
            kwargs["logger"] = False
            callbacks.append(AttachLoggers([TensorBoardLogger(root, name="tensorboard"), CSVLogger(root, name="csv")]))
        if isinstance(config.get("val_check_interval"), int) and config.get("check_val_every_n_epoch") == 1:
            kwargs["check_val_every_n_epoch"] = None  # validate every k steps of the run, not of each epoch
        logging = config.get("logger") is not False
        run = self.run or Run(root)
        checkpoint = RunCheckpoint(run, f"val_{self.datamodule.modality.unit}", section["checkpoint"])
        if self.lock is not None:
            checkpoint.check_room(self.model)
        self.stop_on_signal = StopOnSignal(checkpoint)
        callbacks += [checkpoint, DivergenceGuard(checkpoint), self.stop_on_signal]
        if logging:
            callbacks += [LearningRateMonitor(logging_interval="step"), TokenThroughputMonitor()]
        callbacks.append(RunSummary(model_line=config.get("enable_model_summary") is not False))
        if config.get("enable_progress_bar") is not False:
            callbacks.append(RunProgress())
        kwargs["callbacks"] = [*(config.get("callbacks") or []), *callbacks]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as e:
            raise InputError(f"trainer: {' '.join(str(e).split())}") from e
        if self.subcommand == "fit":
            check_the_run_has_length(trainer)
        check_cluster(trainer)
        precision = str(config.get("precision"))
        if isinstance(trainer.accelerator, CPUAccelerator) and precision.startswith("16"):
            raise InputError(
                f"trainer.precision={precision!r} needs a CUDA GPU (fp16 autocast); on a CPU use 32-true or bf16-mixed"
            )
        self._try_attention(trainer)
        if self.subcommand in (None, "fit"):
            self._check_memory(trainer)
        return trainer

    def _check_memory(self, trainer: L.Trainer) -> None:
        """Refuse, before the first step allocates it, a step this machine has no memory for (``memory.py``), naming
        its biggest part and the option that shrinks it; a step of minutes gets a line first: its memory and time."""
        if not isinstance(trainer.accelerator, CPUAccelerator):
            return
        model, batch = self.model.model, self.datamodule.batch_size
        allocator.configure(4 * batch * model.seq_len * model.config.d_model)
        shards = trainer.world_size if isinstance(trainer.strategy, FSDP2Strategy) else 1
        step = memory.estimate(model, batch, shards, str(trainer.precision))
        processes = trainer.num_devices  # on this machine, each with its own step
        need, free = step.total * processes, memory.available()
        each = f" for each of {processes} processes" if processes > 1 else ""
        if free is not None and need > free:
            biggest = step.biggest()
            raise InputError(
                f"a training step of {batch} x {model.seq_len:,} tokens needs about {memory.gib(step.total)}{each} "
                f"({step.describe()}), more than the {memory.gib(free)} of memory available; the most is {biggest}: "
                f"{memory.SHRINK[biggest]}"
            )
        flops = memory.step_flops(model, batch)
        if flops >= memory.LONG_STEP_FLOPS and trainer.is_global_zero:
            rate = memory.gemm_rate() * memory.EFFICIENCY / processes
            room = f" of the {memory.gib(free)} available" if free is not None else ""
            rank_zero_info(
                f"step: {batch} x {model.seq_len:,} tokens need about {memory.gib(step.total)}{each}{room} "
                f"({step.describe()}); {flops / 1e12:,.1f} TFLOP, about {memory.duration(flops / rate)} a step on this CPU"
            )

    def _try_attention(self, trainer: L.Trainer) -> None:
        """The attention backend, forward and backward on a tiny case on the trainer's CPU in its precision
        (``selfcheck.py``): a backend or precision it cannot run is one line now, not a traceback in the first
        backward. On CUDA the Triton kernel checks itself on its first call instead (no CUDA before the launch)."""
        network, device = self.model.hparams.network, trainer.strategy.root_device
        backend = getattr(network.attention, "backend", None)
        if backend is None or device.type != "cpu" or self.subcommand not in (None, "fit"):
            return
        precision = str(trainer.precision)
        dtype = PRECISION_DTYPES.get(precision.split("-")[0], torch.float32)
        pattern = network.pattern  # a few strides of it: every kind of piece a kernel makes of the layout
        n = min(network.context, 4 * (pattern.stride or pattern.block_size)) // pattern.block_size * pattern.block_size
        layout = pattern.layout(network.n_heads, n)
        problem = try_backend(
            get_backend(backend, device), device, dtype, network.head_dim, pattern.block_size, layout,
            trainer.precision_plugin.forward_context,
        )  # fmt: skip
        if problem is not None:
            chosen = backend if backend != "auto" else f"auto ({resolve_backend(backend, device)})"
            raise InputError(
                f"model.network.attention.backend {chosen} cannot train on this CPU in trainer.precision {precision} "
                f"({problem}); choose another backend or precision"
            )

    def fit(self, model: L.LightningModule, datamodule: L.LightningDataModule, **kwargs: Any) -> None:
        """``trainer.fit`` from the run's checkpoint; in a run of several processes, watched for a failure of any."""
        if self.trainer.world_size > 1:
            self.watch = self._failure_watch()
            start_once_launched(self.watch, self.trainer.strategy)
        self.trainer.fit(model, datamodule, ckpt_path=self.run.resume_from)

    def after_fit(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        close_process_group()
        stopped = self.stop_on_signal.outcome()
        if stopped is not None:
            raise stopped

    def _failure_watch(self) -> FailureWatch:
        strategy = self.trainer.strategy
        strategy.set_world_ranks()  # the ranks Lightning would set when fit starts, from the cluster's variables
        environment, rank = strategy.cluster_environment, self.trainer.global_rank
        cleanup = self.lock.release if self.lock is not None else None
        ranks = (rank, self.trainer.world_size)
        return FailureWatch(environment.main_address, environment.main_port, f"rank {rank}", ranks, cleanup)

    def _tell_the_other_ranks(self, error: Exception) -> None:
        """In a run of several processes, a failure here ends the others with the same line (``distributed.py``)."""
        watch = self.watch or watch_from_environment()
        if watch is None:
            return
        cause = input_error(error)
        if cause is None and lost_peer(error):
            watch.await_verdict()  # the watch names the rank that died, and ends this one with that line
        message = one_line(cause) if cause is not None else port_taken(error, watch.address, watch.port, watch.rank)
        if message is None:  # an unexpected error: the others stop too, this rank shows the traceback
            watch.report(f"{type(error).__name__}: {' '.join(str(error).split())[:300]}")
            return
        raise InputError(watch.report(message)) from error


ZERO_TRAINS_NOTHING = {  # Lightning would return from fit at once, silently
    "max_steps": "a number of steps >= 1, or -1 to let max_epochs decide",
    "max_epochs": "a number of epochs >= 1",
    "limit_train_batches": "batches per epoch >= 1, or a fraction of an epoch in (0, 1]",
}


def check_the_run_has_length(trainer: L.Trainer) -> None:
    """Refuse a fit that would train nothing, or never end: the learning rate's cosine decays to the last step.
    Without ``max_epochs``, ``max_time`` (Lightning's Timer) leaves the epochs unlimited, as fit will."""
    for name, allowed in ZERO_TRAINS_NOTHING.items():
        if (value := getattr(trainer, name)) == 0:
            raise InputError(f"trainer.{name}={value} trains nothing; give {allowed} (train.py validate only evaluates)")
    timed = any(isinstance(callback, Timer) for callback in trainer.callbacks)
    if trainer.max_steps == -1 and (trainer.max_epochs == -1 or trainer.max_epochs is None and timed):
        epochs = "max_epochs=-1" if trainer.max_epochs == -1 else "max_time without max_epochs"
        raise InputError(
            f"trainer.max_steps=-1 and {epochs} give the run no last step, and the learning rate decays to it; set "
            "trainer.max_steps or trainer.max_epochs (trainer.max_time can still stop the run sooner)"
        )


def check_cluster(trainer: L.Trainer) -> None:
    """Devices and nodes that the launcher's own count contradicts (torchrun's world size, SLURM's tasks and
    nodes), in one line now: Lightning checks them only once fit launches, after a rank asked for a device it
    lacks (a traceback)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None:
        return
    try:
        environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    except ValueError as e:
        raise InputError(f"trainer: {' '.join(str(e).split())}") from e


def close_process_group() -> None:
    """End a multi-process run's process group while the interpreter is whole, every rank together.

    Lightning destroys the group at exit only for NCCL; a gloo group left to the interpreter's shutdown is
    destroyed with its worker threads still holding tensors, and rank 0 (which also serves the rendezvous store)
    may be torn down while another rank still talks to it. Either can kill a finished run with a segfault.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    try:
        torch.distributed.barrier()  # every rank is done with the group before any destroys it
    finally:
        torch.distributed.destroy_process_group()


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run``, execute) the CLI; tests and tools use ``run=False`` to get the objects."""
    return SparseTransformerCLI(args=args, run=run)
