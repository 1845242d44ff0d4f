"""OpenMP's spin-wait for the machine's load (sparse_transformer/threads.py): chosen before torch loads, by the load
at start, never over the user's own setting."""

import os
import subprocess
import sys

import pytest

from sparse_transformer import threads
from commands import ROOT


def spin_of(code: str, **env: str) -> str:
    """GOMP_SPINCOUNT as a fresh Python process running ``code`` sees it, with ``env`` on top of a clean one."""
    clean = {k: v for k, v in os.environ.items() if k not in (*threads.USER_SETTINGS, threads.SWITCH)}
    script = f"{code}\nimport os; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()[-1]


def test_train_py_sets_the_spin_before_torch_loads():
    assert spin_of("import train") in {threads.IDLE["GOMP_SPINCOUNT"], threads.BUSY["GOMP_SPINCOUNT"]}


CONFIGURE = "from sparse_transformer import threads; threads.configure()"


def test_the_users_setting_and_the_switch_are_left_alone():
    assert spin_of(CONFIGURE, GOMP_SPINCOUNT="77") == "77"
    assert spin_of(CONFIGURE, OMP_WAIT_POLICY="PASSIVE") == "unset"
    assert spin_of(CONFIGURE, **{threads.SWITCH: "off"}) == "unset"


def test_nothing_once_torch_is_loaded():
    assert spin_of(f"import torch; {CONFIGURE}") == "unset"


@pytest.mark.parametrize("load, spin", [(0.2, "10000"), (1.0, "1000"), (5.0, "1000")])
def test_the_load_at_start_chooses(monkeypatch, load, spin):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert threads.settings() == {"GOMP_SPINCOUNT": spin}
