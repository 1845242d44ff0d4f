"""Train a Sparse Transformer: ``python train.py fit --config configs/quickstart.yaml``.

Everything is configured through LightningCLI (``sparse_transformer/training/cli.py``): ``--print_config``
shows every option with its value, ``--model.network.n_layers 8`` overrides one. The DataModule's
``seq_len`` and modality set the model's context, its positional shape and the metric's unit; the run's
folder is ``--trainer.default_root_dir``.
"""

from sparse_transformer import threads

threads.configure()  # OpenMP's spin-wait for this machine's load; before torch loads (sparse_transformer/threads.py)

from sparse_transformer.errors import run_cli  # noqa: E402
from sparse_transformer.training.cli import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    run_cli(main)
