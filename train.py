"""Train a Sparse Transformer: ``python train.py fit --config configs/quickstart.yaml``.

Everything is configured through LightningCLI: ``--print_config`` shows every option with its default,
``--model.n_layers 8`` overrides one. The DataModule's ``seq_len`` sets the model's context and its
``modality`` (text, image, audio) the metric's unit and the image shape of the positional embedding.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import NoReturn

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from sparse_transformer.errors import InputError, run_cli
from sparse_transformer.lightning_module import SparseTransformerLM
from sparse_transformer.resume import check_resumable, resolve_ckpt_path


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad option or config value in one line instead of the full usage text."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        detail = " ".join(line.strip() for line in message.splitlines() if line.strip())
        # A bad value under a class_path (data: ...) comes wrapped in every Union alternative; keep the cause.
        if inner := re.search(
            r"^Parser key \"([^\"]+)\".*?Problem with given class_path '([^']+)': (.*?)(?: - Expected a|$)", detail
        ):
            detail = f"{inner[1]} ({inner[2]}): {inner[3]}"
        print(f"error: {detail} (see --help)", file=sys.stderr)
        sys.exit(2)


class SparseTransformerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.seq_len", "model.seq_len", apply_on="instantiate")
        parser.link_arguments("data.modality", "model.modality", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Lightning checks accelerator, strategy, devices and precision here; a refusal is a bad config."""
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as e:
            raise InputError(f"trainer: {' '.join(str(e).split())}") from e

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's settings with the checkpoint's; for fit we check they match instead."""
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def before_fit(self) -> None:
        """``--ckpt_path last`` resumes from the run's last.ckpt; any checkpoint is checked before restoring."""
        config = self.config_init["fit"]
        if config.get("ckpt_path") and config["ckpt_path"] not in ("best", "hpc"):
            config["ckpt_path"] = resolve_ckpt_path(self.trainer, config["ckpt_path"])
            check_resumable(config["ckpt_path"], self.model)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run``, execute) the CLI; tests and tools use ``run=False`` to get the objects."""
    torch.set_float32_matmul_precision("high")
    # Lightning cannot see that our training sampler resumes mid-epoch (data/sampler.py); it does.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    return SparseTransformerCLI(
        SparseTransformerLM,
        L.LightningDataModule,
        subclass_mode_data=True,
        parser_class=OneLineErrorParser,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    run_cli(main)
