"""The machine a figure was measured on, named the same way in every results file: figures compare only within
one CPU (or GPU), so each names its model, the instruction sets the kernels' speed depends on, and the threads."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# x86: AVX2 / AVX-512 (bf16, fp16, VNNI) / AMX; Arm: NEON (asimd), SVE; sha_ni speeds the checkpoints' SHA-256
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "sve", "sha_ni")  # fmt: skip


def device_name(device: torch.device | str) -> str:
    """A CUDA device's name, or the CPU's (:func:`cpu_name`) and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def cpu_name() -> str:
    """The CPU's model and the instruction sets it has of :data:`CPU_FLAGS`, e.g. ``AMD EPYC (avx2 fma avx512f
    avx512_vnni avx512_bf16 sha_ni; torch uses AVX512)``."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    field = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines if ":" in line}
    model = field.get("model name") or platform.processor() or "CPU"
    flags = set((field.get("flags") or field.get("Features") or "").split())
    have = [f for f in CPU_FLAGS if f in flags]
    return f"{model} ({' '.join(have) or 'no flags read'}; torch uses {torch.backends.cpu.get_cpu_capability()})"


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, e.g. ``0.56 0.97 1.22`` (``?`` where the OS has none): on a shared
    machine, what else ran beside a benchmark."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "?"
