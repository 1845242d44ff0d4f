"""Several nodes, as a cluster launches them, on this one machine: 2 nodes x 1 process each, under torchrun (a static
rendezvous on 127.0.0.1) or with Lightning's variables (MASTER_ADDR, MASTER_PORT, NODE_RANK), as SLURM's srun
would start them. They train and resume; a node that dies ends the other within seconds in one line; settings the
nodes or the launcher contradict are one line, with nothing written."""

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

import train
from commands import ROOT, error_line_in_process
from sparse_transformer.training.distributed import BEAT, LOST_SECONDS
from sparse_transformer.training.resume import read_checkpoint

FSDP2 = ["--config", "configs/strategies/fsdp2.yaml"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_node_outlives_its_test():
    """A test that fails or times out waiting leaves no node running (it would hold the cores for the rest)."""
    yield
    while STARTED:
        node = STARTED.pop()
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)  # its group: torchrun's worker too
            node.wait()


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    node = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    STARTED.append(node)
    return node


def fit(root, *args: str) -> list[str]:
    """``train.py fit`` on tiny.yaml as one of 2 nodes of 1 process, in the run folder ``root``."""
    return [
        "train.py", "fit", "--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false",
        "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.default_root_dir", str(root), *args,
    ]  # fmt: skip


def torchrun_node(rank: int, port: int, root, *args: str) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    launcher += ["--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    return start([*launcher, *fit(root, *args)])


def lightning_node(rank: int, port: int, root, *args: str) -> subprocess.Popen:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank)}
    return start([sys.executable, *fit(root, *args)], env)


def finish(*nodes: subprocess.Popen) -> list[tuple[int, str]]:
    """Each node's exit status and stderr, once all have ended."""
    stderr = [node.communicate(timeout=300)[1] for node in nodes]
    return [(node.returncode, err) for node, err in zip(nodes, stderr)]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_two_nodes_launched_by_torchrun_train_sharded_are_killed_and_resume(tmp_path):
    """One run folder for both nodes, as on a cluster's shared file system; rank 0 alone writes in it. Every process
    is killed (SIGKILL) as the step after the checkpoint of step 2 starts; that last.ckpt resumes on both nodes."""
    run, every2 = tmp_path / "run", ["--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2"]
    kill = ["--trainer.callbacks+=tests.killer.KillAtStep", "--trainer.callbacks.step=2"]
    for args in (kill, ["--ckpt_path", "last"]):
        port = free_port()
        (code0, err0), (code1, err1) = finish(*(torchrun_node(rank, port, run, *FSDP2, *every2, *args) for rank in (0, 1)))
    assert code0 == code1 == 0, err0[-3000:] + err1[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'} at step 2" in err0
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 4
    assert state["ByteTextDataModule"] == {"train_sampler": {"epoch": 0, "consumed": 32, "start": 0, "behind": 0}}  # 4 steps x 4 windows x 2 nodes


@pytest.mark.slow
def test_a_node_that_dies_ends_the_other_within_seconds_with_one_line(tmp_path):
    """Node 1 is killed (SIGKILL: no word, no exception) at step 2; node 0 is left in a collective with it."""
    port = free_port()
    kill = ["--trainer.callbacks+=tests.killer.SignalAtStep", "--trainer.callbacks.step=2"]
    kill += ["--trainer.callbacks.signal=SIGKILL", "--trainer.callbacks.rank=1"]
    node0 = lightning_node(0, port, tmp_path / "node0", *FSDP2, "--trainer.max_steps", "50")
    node1 = lightning_node(1, port, tmp_path / "node1", *FSDP2, "--trainer.max_steps", "50", *kill)
    node1.wait(timeout=300)
    died = time.monotonic()
    _, err0 = node0.communicate(timeout=300)
    ended = time.monotonic()
    assert node1.returncode == -9
    assert node0.returncode == 2 and "Traceback" not in err0, err0[-3000:]
    assert errors(err0) == [
        f"error: rank 1: stopped without a word for {LOST_SECONDS:g} s (killed, out of memory, or its node went down); "
        "every rank stops"
    ]
    assert ended - died < LOST_SECONDS + 20  # seconds, not the 30-minute timeout of a collective


def test_a_rank_whose_store_closes_ends_in_one_line():
    """Rank 0 dies: the store it served goes with it (under torchrun, with node 0's agent), and rank 1 stops."""
    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    watch = "from sparse_transformer.training.distributed import FailureWatch; import time; "
    watch += f"FailureWatch('127.0.0.1', {port}, 'rank 1', (1, 2)).start(); time.sleep(60)"
    rank1 = start([sys.executable, "-c", watch])
    deadline = time.monotonic() + 60
    while store.add(f"{BEAT}1", 0) == 0 and time.monotonic() < deadline:  # until rank 1 beats
        time.sleep(0.1)
    del store  # rank 0's process is gone
    _, stderr = rank1.communicate(timeout=60)
    assert rank1.returncode == 2
    assert errors(stderr) == [
        f"error: rank 1: the run's store at 127.0.0.1:{port} closed: rank 0 or node 0 stopped (killed, out of memory, "
        "or its node went down)"
    ]


@pytest.mark.slow
def test_nodes_launched_for_different_world_sizes_end_in_one_line_and_write_nothing(tmp_path):
    """Node 1 says 3 nodes, node 0 says 2: node 1 would wait in the rendezvous for a rank that never comes."""
    port = free_port()
    node0 = lightning_node(0, port, tmp_path / "node0")
    node1 = lightning_node(1, port, tmp_path / "node1", "--trainer.num_nodes", "3")
    (code0, err0), (code1, err1) = finish(node0, node1)
    expected = [
        "error: rank 1: launched as one of 3 processes, and rank 0 as one of 2 (processes = --trainer.num_nodes x "
        "--trainer.devices); give every node the same num_nodes and devices"
    ]
    assert code0 == code1 == 2 and errors(err0) == errors(err1) == expected, err0[-3000:] + err1[-3000:]
    assert not (tmp_path / "node0").exists() and not (tmp_path / "node1").exists()


@pytest.mark.slow
def test_a_main_port_another_program_holds_is_one_line_and_nothing_written(tmp_path):
    with socket.socket() as holder:
        holder.bind(("", 0))  # every address, as a server binds
        holder.listen()
        port = holder.getsockname()[1]
        (code, stderr), = finish(lightning_node(0, port, tmp_path / "run"))
    assert code == 2 and len(errors(stderr)) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors(stderr)[0].startswith(f"error: rank 0: the main port 127.0.0.1:{port} is taken")
    assert not (tmp_path / "run").exists()


def test_devices_and_nodes_that_slurm_contradicts_are_one_line_and_nothing_written(capsys, monkeypatch, tmp_path):
    """srun started 2 tasks on this node; the command line asks for 1 device per node."""
    for name, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # Lightning's SLURM environment sets it when asked for it
    run = tmp_path / "run"
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.strategy", "ddp", "--trainer.devices", "1"]
    args += ["--trainer.default_root_dir", str(run)]
    line = error_line_in_process(capsys, train.main, *args)
    assert line == (
        "error: trainer: You set `devices=1` in Lightning, but the number of tasks per node configured in SLURM "
        "`--ntasks-per-node=2` does not match. HINT: Set `devices=2`."
    )
    assert not run.exists()
