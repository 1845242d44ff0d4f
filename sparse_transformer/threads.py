"""CPU threads that give way on a busy machine: OpenMP's spin-wait for train.py and sample.py, set before torch loads.

PyTorch's CPU threads come from OpenMP (GNU libgomp in PyPI's Linux builds). Between parallel regions a thread
spin-waits, by default 300,000 times (about 7 ms on a Zen 4 core), before it sleeps. On an idle machine that
saves a wake-up between the ~1,000 small regions of a training step; beside another busy process a spinning
thread holds the core its partner needs to finish the region, and a quickstart step slowed 4.7x on 2 cores
instead of about 2x. A spin of 10,000 (about 0.25 ms) still covers almost every gap between regions of a step,
so an idle machine loses nothing; 1,000 (about 25 us) gives the core back at once and did best on a busy one
(``bench/busy.py``, ``bench/results/busy-cpu.md``). So ``configure`` picks by the load when the process starts:
1,000 if the 1-minute load average is at least half the cores, else 10,000.

libgomp reads the setting once, when torch loads it, so ``configure`` must run before torch is imported (it does
nothing after). A setting the user made (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is left alone, and
``SPARSE_TRANSFORMER_THREADS=off`` leaves OpenMP's defaults.
"""

from __future__ import annotations

import os
import sys

SWITCH = "SPARSE_TRANSFORMER_THREADS"  # "off": OpenMP's own settings
IDLE, BUSY = {"GOMP_SPINCOUNT": "10000"}, {"GOMP_SPINCOUNT": "1000"}
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def configure() -> dict[str, str]:
    """Set the spin-wait for this process's load in the environment, unless the user chose one or torch is
    already loaded; call before importing torch. Returns what it set."""
    if os.environ.get(SWITCH, "").lower() == "off" or any(name in os.environ for name in USER_SETTINGS) or "torch" in sys.modules:
        return {}
    chosen = settings()
    os.environ.update(chosen)
    return chosen


def settings() -> dict[str, str]:
    """``BUSY`` when the machine is busy now (1-minute load average at least half its cores), else ``IDLE``."""
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1) / 2
    except (AttributeError, OSError):  # no load average (Windows)
        busy = False
    return BUSY if busy else IDLE


def describe() -> str:
    return (f"GOMP_SPINCOUNT={IDLE['GOMP_SPINCOUNT']} on an idle machine, {BUSY['GOMP_SPINCOUNT']} when the load average "
            f"at start is at least half the cores; nothing if {' or '.join(USER_SETTINGS)} is set, or {SWITCH}=off")
