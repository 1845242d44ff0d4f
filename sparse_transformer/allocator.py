"""glibc's malloc for long sequences: memory a step frees goes back to the system, so its peak is what it holds.

glibc serves a request above its mmap threshold with a mapping of its own, unmapped when freed; smaller ones come
from the heap, which keeps what is freed for reuse. The threshold starts at 128 KiB and rises to the size of each
mapped block freed, up to 32 MiB. A long sequence's step makes and frees tensors of 4 to 32 MiB (the chunks of its
loss and of its MLP under recompute, and their gradients) in orders the heap cannot reuse, so after the first of
them the heap holds memory no tensor uses: at N = 131,072 (4 layers, d = 192, recompute) a step peaked at 24
units of N x d floats, against 14.5 with the threshold fixed at 4 MiB. ``configure`` fixes it for a step whose
``[B, N, d_model]`` tensors are ``LONG`` bytes or more (mallopt also stops it rising): from N = 16,384 at d = 192,
where a step takes seconds and a fresh mapping's page faults are a small part of it. A short sequence's tensors
are small and reused every step; it keeps glibc's default, whose reuse saves it those page faults.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
THRESHOLD = 4 << 20
LONG = 8 << 20  # bytes of a step's [B, N, d_model] fp32 tensor from which the threshold is fixed


def configure(unit_bytes: int) -> bool:
    """Fix glibc's mmap threshold for a step whose ``[B, N, d_model]`` tensors take ``unit_bytes`` if that is long;
    whether it was set (not on other C libraries, or short steps)."""
    return unit_bytes >= LONG and map_above(THRESHOLD)


def map_above(threshold: int) -> bool:
    """Give every allocation above ``threshold`` bytes a mapping of its own, unmapped when freed (the threshold no
    longer rises); whether it was set (glibc on Linux only). ``bench/memory.py`` uses it at 128 KiB, so memory freed
    earlier is not reused unseen."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # musl and others have none
        return False
    # The trim threshold (free memory the heap keeps at its top) rose with the mmap threshold: set it as glibc would.
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * threshold))
