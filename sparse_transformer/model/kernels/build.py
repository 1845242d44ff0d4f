"""Build the C++ CPU kernel (``blocksparse_cpu.cpp``) on this machine, once, and load it into torch.

Built on first use rather than at install: a build at install would need torch in pip's isolated build
environment (several GB), and compiling for the machine it runs on lets the compiler use all its vector
instructions (``-march=native``). One ``c++`` call against the torch headers, about 10 s on 2 cores; the result is
kept in ``$SPARSE_TRANSFORMER_CACHE`` (default ``~/.cache/sparse_transformer``) under a name that hashes the
source, torch's version, the compiler command and the CPU's flags, so a change of any of them builds anew.
Without a compiler, or where torch lacks what the kernel links to (BLAS's ``sgemm_``), ``load`` says why once and
returns False; ``auto`` then falls back to the ``pieces`` backend.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("blocksparse_cpu.cpp")
OPS_NAMESPACE = "sparse_transformer_cpp"


@functools.cache
def load() -> bool:
    """Load the kernel's ops (``torch.ops.sparse_transformer_cpp``), building them first if need be."""
    try:
        path = build()
        torch.ops.load_library(str(path))
        return True
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"the C++ CPU attention kernel is unavailable ({e}); using the pieces backend", stacklevel=2)
        return False


def build() -> Path:
    """The kernel's shared library, compiled unless the cache has it. Raises with the compiler's message."""
    if sys.platform == "win32":
        raise OSError("building it on Windows is not supported")
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler found (set CXX, or install g++)")
    torch_dir = Path(torch.__file__).parent
    command = [
        compiler, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        str(SOURCE), f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip
    if sys.platform.startswith("linux"):
        command.append("-Wl,-z,defs")  # a symbol torch does not provide fails here, not when loaded
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, *command, _cpu_flags()]).encode()).hexdigest()
    cache = Path(os.environ.get("SPARSE_TRANSFORMER_CACHE") or Path.home() / ".cache" / "sparse_transformer")
    target = cache / f"blocksparse_cpu-{key[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # a pause of seconds at a run's start deserves a line; once per machine and torch version
    print(f"building the C++ CPU attention kernel (once, about 10 s) into {target}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        scratch = Path(tmp) / target.name
        done = subprocess.run([*command, "-o", str(scratch)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            last = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()[-1:]
            raise OSError(f"{Path(compiler).name} failed: {last[0] if last else done.returncode}")
        os.replace(scratch, target)  # atomic: processes building at once each write their own, the last wins
    return target


def _cpu_flags() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the platform's description."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    import platform

    return platform.platform() + platform.processor()
