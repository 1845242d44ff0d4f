"""Running the real command lines from tests: ``python train.py ...`` / ``python sample.py ...`` in the repo root."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a command that failed on bad input (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def train_tiny_checkpointing(tmp_path: Path, trainer_options: str, *args: str) -> subprocess.CompletedProcess:
    """``train.py fit`` on tiny.yaml, one thread per process, with a checkpoint every 2 steps in
    ``tmp_path/checkpoints`` (save_last) and metrics to CSV under ``tmp_path/csv``; ``trainer_options`` are
    more YAML lines under ``trainer:``."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"""
trainer:
{trainer_options}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {tmp_path}, name: csv}}
  callbacks:
    - class_path: sparse_transformer.callbacks.NonFiniteLossGuard
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path}/checkpoints, every_n_train_steps: 2, save_last: true}}
""")
    command = [sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--config", str(overlay), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models, and 2 DDP processes on a 2-core box
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
