"""Build the C++ CPU kernel (``blocksparse_cpu.cpp``) on this machine, once, and load it into torch.

Built on first use rather than at install: a build at install would need torch in pip's isolated build
environment (several GB), and compiling for the machine it runs on lets the compiler use all its vector
instructions (``-march=native``). ``torch.utils.cpp_extension.load`` compiles it with ninja, about 10 s on 2 cores,
into a folder of ``$SPARSE_TRANSFORMER_CACHE`` (default ``~/.cache/sparse_transformer``) named by a hash of the
source, torch's version, the compiler and its flags, and the CPU's flags: a change of any of them builds anew, and a
home folder shared by machines with different CPUs holds one build for each.

One build per machine: the processes of a run, and runs started at once, take a lock on that folder; the first
builds, the others wait and load its library. The lock is the operating system's (``flock``), released when its
holder dies, so a build killed halfway is finished in place by the next process. torch 2.11's own lock is a file
whose mere existence blocks, left behind by a killed build and then waited on forever; under ours it is known to be
stale and is removed, as are scratch folders left by the killed builds of this module's earlier ``c++`` call. A
cache that cannot be written (read-only, or not a folder) gives way, with a warning naming the variable, to a
folder of this user's in the temporary folder, which the processes of a run share too. A process that finds the
kernel built still pays for cpp_extension's checks (the compiler's version, a ninja run with nothing to do): about
0.1 to 0.7 s on a busy 2-core machine, once per process.

Without a compiler, or where torch lacks what the kernel links to (BLAS's ``sgemm_``), ``load`` says why once and
returns False; ``auto`` then falls back to the ``pieces`` backend.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch
from filelock import FileLock

SOURCE = Path(__file__).with_name("blocksparse_cpu.cpp")
OPS_NAMESPACE = "sparse_transformer_cpp"  # TORCH_LIBRARY's namespace in the source: torch.ops.sparse_transformer_cpp
CACHE_VARIABLE = "SPARSE_TRANSFORMER_CACHE"
NAME = "blocksparse_cpu"  # the library's file name in its folder
LOCK_TIMEOUT_S = 900  # a build takes seconds; a holder stuck for this long is not going to finish
STALE_S = 600  # a scratch folder untouched this long belonged to a build that died


@functools.cache
def load() -> bool:
    """Load the kernel's ops (``torch.ops.sparse_transformer_cpp``), building them first if need be."""
    try:
        build()
        return True
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"the C++ CPU attention kernel is unavailable ({_first_error(e)}); using the pieces backend", stacklevel=2)
        return False


def build() -> Path:
    """Compile the kernel unless its folder in the cache holds it, and load it; the library's path. Raises with
    the compiler's message."""
    if sys.platform == "win32":
        raise OSError("building it on Windows is not supported")
    compiler = os.environ.get("CXX", "c++")  # the compiler cpp_extension runs
    if shutil.which(compiler) is None:
        raise OSError(f"no C++ compiler found ({compiler}; set CXX, or install g++)")
    cpp_extension = _cpp_extension()
    _put_ninja_on_path()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    cflags = ["-O3", "-march=native", "-fopenmp", "-std=c++20", abi]  # c++20: torch 2.14's headers; 2.11 passes c++17
    ldflags = ["-fopenmp"]
    if sys.platform.startswith("linux"):
        ldflags.append("-Wl,-z,defs")  # a symbol torch does not provide fails the build, not the load
    compiler_path = os.path.realpath(shutil.which(compiler))  # e.g. /usr/bin/g++-12: its version is in the name
    key = "\0".join([SOURCE.read_text(), torch.__version__, compiler_path, *cflags, *ldflags, _cpu_flags()])
    cache = cache_folder()
    folder = cache / f"{NAME}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    folder.mkdir(exist_ok=True)
    library = folder / f"{NAME}.so"
    with FileLock(folder / "build.lock", timeout=LOCK_TIMEOUT_S):
        _sweep(cache)
        (folder / "lock").unlink(missing_ok=True)  # torch 2.11's lock file: with ours held, a leftover of a killed build
        if not library.exists():  # a pause of seconds at a run's start deserves a line; once per machine and key
            print(f"building the C++ CPU attention kernel (once, about 10 s) into {folder}", file=sys.stderr, flush=True)
        cpp_extension.load(
            NAME, [str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(folder), is_python_module=False
        )
    return library


def cache_folder() -> Path:
    """``$SPARSE_TRANSFORMER_CACHE`` or ``~/.cache/sparse_transformer``; where that cannot be written, this user's
    folder in the temporary folder, with a warning."""
    chosen = Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "sparse_transformer")
    try:
        chosen.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=chosen).close()  # writable: by trying, as permissions do not bind root
        return chosen
    except OSError as e:
        private = Path(tempfile.gettempdir()) / f"sparse_transformer-{os.getuid()}"
        warnings.warn(
            f"the C++ kernel's cache {chosen} cannot be written ({e.strerror or e}); building it in {private} instead "
            f"(set {CACHE_VARIABLE} to a writable folder to keep it)",
            stacklevel=2,
        )
        private.mkdir(mode=0o700, exist_ok=True)
        if private.is_symlink() or private.stat().st_uid != os.getuid():  # a shared temp folder: another user's trap
            raise OSError(f"{private} is not a folder of this user's") from e
        return private


def _sweep(cache: Path) -> None:
    """Remove the scratch folders (``tmp*``) that builds killed halfway left in the cache: this module's own
    ``c++`` call, before cpp_extension built in place, compiled each process's build in one."""
    for scratch in cache.glob("tmp*"):
        if scratch.is_dir() and time.time() - scratch.stat().st_mtime > STALE_S:
            shutil.rmtree(scratch, ignore_errors=True)


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported on first use (a GPU run never needs it), without the warning its import
    gives where a CUDA toolkit is installed but no GPU: it is about CUDA builds, and this one is for the CPU."""

    def not_about_cuda(record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()

    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addFilter(not_about_cuda)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.removeFilter(not_about_cuda)
    return cpp_extension


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH. PyPI's (a dependency) lies beside this environment's Python, which
    is not on PATH when the environment is used without being activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # cpp_extension says "Ninja is required"
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _first_error(e: Exception) -> str:
    """The line of a failed build's output that says why (cpp_extension raises with all of it), else its first."""
    lines = str(e).splitlines()
    cause = [line for line in lines if "error:" in line or "undefined reference" in line] or lines[:1]
    return cause[0].strip() if cause else type(e).__name__


def _cpu_flags() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the platform's description."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    import platform

    return platform.platform() + platform.processor()
