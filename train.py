"""Train a Sparse Transformer: ``python train.py fit --config configs/quickstart.yaml``.

Everything is configured through LightningCLI: ``--print_config`` shows every option with its default,
``--model.n_layers 8`` overrides one. The DataModule's ``seq_len`` sets the model's context and its
``modality`` (text, image, audio) the metric's unit and the image shape of the positional embedding.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sparse_transformer.errors import run_cli
from sparse_transformer.lightning_module import SparseTransformerLM


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad option or config value in one line instead of the full usage text."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        detail = " ".join(line.strip() for line in message.splitlines() if line.strip())
        print(f"error: {detail} (see --help)", file=sys.stderr)
        sys.exit(2)


class SparseTransformerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.seq_len", "model.seq_len", apply_on="instantiate")
        parser.link_arguments("data.modality", "model.modality", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run``, execute) the CLI; tests and tools use ``run=False`` to get the objects."""
    torch.set_float32_matmul_precision("high")
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
