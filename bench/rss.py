"""Resident memory of this process, read from the OS: the standard library only, so a bench's child process can
measure itself without importing anything heavier than what it runs.

The peak is Linux's VmHWM, the high-water mark of this process's own address space. ``getrusage``'s ``ru_maxrss``
is not: exec carries the parent's mark over, so a child of a 4 GB pytest process reports 4 GB before it starts.
"""

from __future__ import annotations

import os
from pathlib import Path


def _status(key: str) -> int:
    """A ``/proc/self/status`` entry in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return 0


def current_rss() -> int:
    """Resident set size in bytes now (Linux /proc; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """This process's resident-memory high-water mark in bytes, since it started or since :func:`reset_peak`."""
    return _status("VmHWM")


def reset_peak() -> None:
    """Sets the high-water mark to the resident size now, so :func:`peak_rss` measures from here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
