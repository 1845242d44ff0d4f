"""Train a Sparse Transformer: ``python train.py fit --config configs/quickstart.yaml``.

Everything is configured through LightningCLI: ``--print_config`` shows every option with its default,
``--model.n_layers 8`` overrides one. The DataModule's ``seq_len`` sets the model's context.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from sparse_transformer.errors import InputError
from sparse_transformer.lightning_module import SparseTransformerLM


class SparseTransformerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.seq_len", "model.seq_len", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run``, execute) the CLI; tests and tools use ``run=False`` to get the objects."""
    torch.set_float32_matmul_precision("high")
    return SparseTransformerCLI(
        SparseTransformerLM,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
