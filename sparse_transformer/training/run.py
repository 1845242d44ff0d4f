"""A run: its folder, the checkpoint it resumes from and its seed, made once when the command line is read and
handed to what needs it (the checkpoint callback, the signal handler, ``fit``).

``trainer.default_root_dir`` is the run's folder and holds everything it writes:

    <run folder>/checkpoints/   last.ckpt and the best checkpoints (``checkpointing.RunCheckpoint``)
    <run folder>/tensorboard/   TensorBoard events, one version per start of the run
    <run folder>/csv/           the same metrics as CSV
    <run folder>/samples/       SampleLogger's files, by step
    <run folder>/config.yaml    the full resolved config of the latest start
    <run folder>/run.lock       while the run runs: who runs it (``run_folder.py``)

Left out, the folder is named after the configs: ``--config configs/tiny.yaml --config
configs/variants/performer.yaml`` runs in ``runs/tiny-performer``. A new run refuses a folder that already holds another run's checkpoints, so two runs never overwrite each
other; ``--ckpt_path last`` resumes the run whose folder is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparse_transformer.errors import InputError

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"


@dataclass(frozen=True)
class Run:
    """Where a run lives and what it continues.

    Args:
        folder: the run folder (``trainer.default_root_dir``).
        resume_from: the checkpoint ``fit`` starts from (``--ckpt_path``, ``last`` resolved), None for a new run.
        seed: ``seed_everything`` as configured (None when it is drawn at random or off).
    """

    folder: Path
    resume_from: str | None = None
    seed: int | None = None

    @classmethod
    def start(cls, folder: str | Path, ckpt_path: str | None, seed: object) -> Run:
        """The run a command line asks for: ``last`` is the folder's last.ckpt; without a checkpoint this is a new
        run, which must not share a folder with another run's checkpoints (unless a SLURM requeue left
        Lightning's ``hpc_ckpt_*.ckpt`` there, which Lightning resumes from by itself)."""
        folder = Path(folder)
        try:
            resume_from = _checkpoint_to_resume(folder, ckpt_path)
        except PermissionError as e:
            raise InputError(f"cannot read the run folder {folder}: permission denied ({e.filename})") from e
        return cls(folder, resume_from, seed if isinstance(seed, int) and not isinstance(seed, bool) else None)

    @property
    def checkpoints(self) -> Path:
        return self.folder / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST


def folder_for(configs: list) -> Path:
    """The run folder when none is given: ``runs/`` and the names of the config files, joined by ``-``."""
    return Path("runs") / ("-".join(Path(str(c)).stem for c in configs) or "default")


def _checkpoint_to_resume(folder: Path, ckpt_path: str | None) -> str | None:
    checkpoints = folder / CHECKPOINTS
    if ckpt_path == "last":
        last = checkpoints / LAST
        if not last.is_file():
            raise InputError(
                f"--ckpt_path last: no {last}; resume a run by naming its folder (--trainer.default_root_dir) "
                "or give the checkpoint's path"
            )
        return str(last)
    if ckpt_path is None and not any(folder.glob("hpc_ckpt_*.ckpt")):
        existing = sorted(p.name for p in checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
        if existing:
            raise InputError(
                f"{folder} already holds a run's checkpoints ({', '.join(existing[:3])}); resume that run with "
                "--ckpt_path last, or start a new one in another folder with --trainer.default_root_dir"
            )
    return ckpt_path
