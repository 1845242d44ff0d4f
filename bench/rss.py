"""Resident memory of this process, read from the OS: the standard library only, so a bench's child process can
measure itself without importing anything heavier than what it runs."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def current_rss() -> int:
    """Resident set size in bytes now (Linux /proc; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """The process's resident-memory high-water mark in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
