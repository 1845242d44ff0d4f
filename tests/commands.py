"""Running the real command lines from tests: ``python train.py ...`` / ``python sample.py ...`` in the repo root."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_transformer.errors import run_cli

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
    """``train.py fit`` on tiny.yaml in the run folder ``tmp_path``, one thread per process, with last.ckpt
    saved every 2 steps; ``trainer_options`` are more YAML lines under ``trainer:``."""
    overlay = tmp_path.parent / f"{tmp_path.name}-overlay.yaml"
    overlay.write_text(f"""
trainer:
  default_root_dir: {tmp_path}
  enable_progress_bar: false
{trainer_options}
checkpoint:
  every_n_train_steps: 2
""")
    command = [sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--config", str(overlay), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models, and 2 DDP processes on a 2-core box
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def error_line_in_process(capsys, main, *args: str) -> str:
    """The single ``error:`` line of ``run_cli(main(args))``, a command line's entry point run in this process."""
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: main(list(args)))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]
