"""One folder per run: ``trainer.default_root_dir`` holds everything a run writes.

    <run folder>/checkpoints/   last.ckpt and the best checkpoints (``checkpointing.RunCheckpoint``)
    <run folder>/tensorboard/   TensorBoard events, one version per start of the run
    <run folder>/csv/           the same metrics as CSV
    <run folder>/samples/       SampleLogger's files, by step
    <run folder>/config.yaml    the full resolved config of the latest start

A new run refuses a folder that already holds another run's checkpoints, so two runs never overwrite each
other; ``--ckpt_path last`` resumes the run whose folder is named.
"""

from __future__ import annotations

from pathlib import Path

from sparse_transformer.errors import InputError

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"


def checkpoint_dir(root: str | Path) -> Path:
    return Path(root) / CHECKPOINTS


def checkpoint_to_resume(root: str | Path, ckpt_path: str | None) -> str | None:
    """The checkpoint ``fit`` starts from: ``last`` is the run folder's last.ckpt, other values pass through.

    Without one, this is a new run, and it must not share a folder with another run's checkpoints (unless a
    SLURM requeue left Lightning's ``hpc_ckpt_*.ckpt`` there, which Lightning resumes from by itself).
    """
    root, folder = Path(root), checkpoint_dir(root)
    try:
        return _checkpoint_to_resume(root, folder, ckpt_path)
    except PermissionError as e:
        raise InputError(f"cannot read the run folder {root}: permission denied ({e.filename})") from e


def _checkpoint_to_resume(root: Path, folder: Path, ckpt_path: str | None) -> str | None:
    if ckpt_path == "last":
        last = folder / LAST
        if not last.is_file():
            raise InputError(
                f"--ckpt_path last: no {last}; resume a run by naming its folder (--trainer.default_root_dir) "
                "or give the checkpoint's path"
            )
        return str(last)
    if ckpt_path is None and not any(root.glob("hpc_ckpt_*.ckpt")):
        existing = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if existing:
            raise InputError(
                f"{root} already holds a run's checkpoints ({', '.join(existing[:3])}); resume that run with "
                "--ckpt_path last, or start a new one in another folder with --trainer.default_root_dir"
            )
    return ckpt_path
