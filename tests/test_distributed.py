"""Data parallel training through the real CLI: DDP with 2 CPU processes (gloo); the FSDP overlay's CPU refusal."""

import csv
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from torch.distributed import TCPStore

import train
from commands import ROOT, train_tiny_checkpointing
from sparse_transformer.errors import run_cli
from sparse_transformer.training.distributed import FailureWatch, start_once_launched

DDP = "  strategy: ddp\n  devices: 2\n  max_steps: 4"


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    result = train_tiny_checkpointing(run, DDP)
    assert result.returncode == 0, failure(result)
    assert "Starting with 2 processes" in result.stderr + result.stdout

    # Written once, by rank 0: no second copy (last-v1.ckpt), no temporary left behind.
    last, best = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert best.startswith("step=3-val_bpb=") and last == "last.ckpt"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    # 4 steps of 4 windows on each of 2 ranks: the sampler's position counts both ranks' windows.
    assert state["ByteTextDataModule"] == {"train_sampler": {"epoch": 0, "consumed": 32, "start": 0, "behind": 0}}
    with (run / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["train_bpb_step"]] == [0, 1, 2, 3]
    assert any(r["val_bpb"] for r in rows)


def failure(result: subprocess.CompletedProcess) -> str:
    """A failed run's exit code and stderr: from faulthandler's first report on if a process died by a signal."""
    stacks = result.stderr.find("Fatal Python error")
    return f"exit code {result.returncode}\n" + (result.stderr[stacks:][:10000] if stacks >= 0 else result.stderr[-3000:])


def test_fsdp_overlay_parses_and_cpu_is_refused_in_one_line(capsys):
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / "configs/strategies/fsdp.yaml")]
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: train.main(args))
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: trainer: The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`. "
        "Please set `accelerator='cuda'`, `accelerator='gpu'`, or pass a `CUDAAccelerator()` instance to use FSDP."
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def watching() -> bool:
    return any(thread.name == "failure-watch" for thread in threading.enumerate())


def test_the_failure_watch_starts_after_the_launcher_set_the_environment_and_started_the_ranks(monkeypatch):
    """Its thread's store client reads the environment while connecting, and the launcher adds to it (setenv), which
    can move the array under that read: the likely cause of the launching process's segfault, seen twice in the
    suite's 2-rank runs before it started rank 1 (distributed.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the launcher would otherwise set, with torch's thread count
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)  # the launcher sets them; LOCAL_RANK would make it spawn nothing
    seen = []

    class Launcher(_SubprocessScriptLauncher):
        def _call_children_scripts(self):  # where the launcher sets MASTER_ADDR... and starts ranks 1..
            seen.append(("launching", watching()))

    store = TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    watch = FailureWatch("127.0.0.1", store.port, "rank 0")
    launcher = Launcher(LightningEnvironment(), num_processes=2, num_nodes=1)
    try:
        start_once_launched(watch, SimpleNamespace(launcher=launcher))
        assert not watching()
        assert launcher.launch(lambda x: seen.append(("training", watching())) or x, 7) == 7
    finally:
        watch.stop()
    assert seen == [("launching", False), ("training", True)]


def test_under_a_launcher_that_spawns_the_failure_watch_starts_at_once():
    store = TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    watch = FailureWatch("127.0.0.1", store.port, "rank 0")
    try:
        start_once_launched(watch, SimpleNamespace(launcher=None))
        assert watching()
    finally:
        watch.stop()
    assert not watching()


def node(rank: int, port: int, root, *args: str) -> subprocess.Popen:
    """One node of a two-node run on this machine: ``train.py fit`` on tiny.yaml with NODE_RANK ``rank``."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]
    command += ["--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1"]
    command += ["--trainer.default_root_dir", str(root), *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def error_lines(process: subprocess.Popen, timeout: float = 60) -> tuple[int, list[str], float]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, [line for line in stderr.splitlines() if line.startswith("error:")], time.monotonic()


@pytest.mark.slow
def test_a_check_that_fails_on_one_node_ends_both_at_once_with_its_line(tmp_path):
    """Node 1 resumes from a folder of its own that holds no checkpoint; node 0 has one and would wait for node 1."""
    first = train_tiny_checkpointing(tmp_path / "node0", "  max_steps: 2")
    assert first.returncode == 0, first.stderr[-3000:]
    port = free_port()
    node0 = node(0, port, tmp_path / "node0", "--ckpt_path", "last", "--trainer.max_steps", "4")
    time.sleep(1)
    node1 = node(1, port, tmp_path / "node1", "--ckpt_path", "last", "--trainer.max_steps", "4")
    code1, lines1, end1 = error_lines(node1)
    code0, lines0, end0 = error_lines(node0)
    expected = f"error: node 1: --ckpt_path last: no {tmp_path / 'node1' / 'checkpoints' / 'last.ckpt'};"
    assert code0 == code1 == 2 and len(lines0) == len(lines1) == 1
    assert lines0 == lines1 and lines0[0].startswith(expected)
    assert abs(end0 - end1) < 10  # within seconds of each other, not after a 30-minute rendezvous timeout


@pytest.mark.slow
def test_a_node_rank_given_twice_ends_both_processes_in_one_line(tmp_path):
    port = free_port()
    first = node(0, port, tmp_path / "a")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the first process serves the rendezvous port
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    second = node(0, port, tmp_path / "b")
    code2, lines2, _ = error_lines(second)
    code1, lines1, _ = error_lines(first)
    expected = f"error: rank 0: the main port 127.0.0.1:{port} is taken, so this process cannot be rank 0"
    assert code1 == code2 == 2 and lines1 == lines2 and len(lines1) == 1 and lines1[0].startswith(expected)
