"""The C++ kernel's build (``kernels/build.py``): one per machine, whatever the processes; a build killed halfway
finished by the next; an unwritable cache traded, with a warning naming the variable, for this user's temp folder;
the folder keyed by what the binary depends on. The fast tests stand a recorder in for ``cpp_extension.load``; the
slow ones compile, counting the compiler's calls through a logging ``g++`` in front of the real one."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from commands import ROOT

from sparse_transformer.model.kernels import build

LOADED = "import torch; from sparse_transformer.model.kernels import build; assert build.load(); torch.ops.sparse_transformer_cpp.forward"


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """cpp_extension.load recorded, not run: each call's build folder, its library made as a build would."""
    calls = []

    def load(name, sources, build_directory, **options):
        calls.append(Path(build_directory))
        (Path(build_directory) / f"{name}.so").touch()

    monkeypatch.setattr(build, "_cpp_extension", lambda: SimpleNamespace(load=load))
    compiler = tmp_path / "g++"  # any executable: the key names it, nothing runs it
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv(build.CACHE_VARIABLE, str(tmp_path / "cache"))
    return calls


def test_a_build_says_so_once_and_keys_its_folder_by_the_cpu(recorded, capsys, monkeypatch):
    library = build.build()
    assert capsys.readouterr().err == f"building the C++ CPU attention kernel (once, about 10 s) into {library.parent}\n"
    assert build.build() == library and capsys.readouterr().err == ""  # built: nothing said
    monkeypatch.setattr(build, "_cpu_flags", lambda: "flags : another CPU")
    other = build.build()  # a home folder shared with a machine of another CPU: a build of its own
    assert other.parent != library.parent and recorded == [library.parent, library.parent, other.parent]


def test_leftovers_of_killed_builds_are_removed(recorded, tmp_path):
    """torch 2.11's lock file, waited on forever once its builder died; a scratch folder of the earlier c++ call."""
    folder = build.build().parent
    (folder / "lock").touch()
    old, fresh = tmp_path / "cache" / "tmpold", tmp_path / "cache" / "tmpfresh"
    for scratch in (old, fresh):
        scratch.mkdir()
    os.utime(old, (time.time() - 2 * build.STALE_S,) * 2)
    build.build()
    assert not (folder / "lock").exists() and not old.exists() and fresh.exists()


def test_an_unwritable_cache_falls_back_to_this_users_temp_folder(recorded, tmp_path, monkeypatch):
    """A path under a file: unwritable even for root, whom a read-only folder's permissions do not stop."""
    (tmp_path / "file").touch()
    monkeypatch.setenv(build.CACHE_VARIABLE, str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.warns(UserWarning, match=f"cannot be written .*; building it in .* \\(set {build.CACHE_VARIABLE} to a"):
        library = build.build()
    private = tmp_path / "tmp" / f"sparse_transformer-{os.getuid()}"
    assert library.parent.parent == private and private.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; the test above covers the fallback")
def test_a_read_only_cache_falls_back_too(recorded, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o555)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.warns(UserWarning, match=build.CACHE_VARIABLE):
        assert build.cache_folder() == tmp_path / f"sparse_transformer-{os.getuid()}"


def test_a_temp_folder_that_is_a_link_is_refused(recorded, tmp_path, monkeypatch):
    """In a temp folder every user writes to, the private folder's name could be another user's link."""
    (tmp_path / "file").touch()
    monkeypatch.setenv(build.CACHE_VARIABLE, str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / f"sparse_transformer-{os.getuid()}").symlink_to(tmp_path / "elsewhere")
    with pytest.warns(UserWarning, match="cannot be written"), pytest.raises(OSError, match="is not a folder of this user's"):
        build.cache_folder()


def test_a_failed_compile_warns_with_the_compilers_error(monkeypatch, tmp_path, request):
    """cpp_extension raises with the whole of ninja's output; the warning quotes the line that says why."""
    from torch.utils import cpp_extension
    from torch.utils._cpp_extension_versioner import ExtensionVersioner

    monkeypatch.setattr(cpp_extension, "JIT_EXTENSION_VERSIONER", ExtensionVersioner())  # this process's builds: as they were
    compiler = tmp_path / "g++"
    version = 'case "$*" in *-dumpfullversion*) echo 12.2.0; exit 0;; esac'  # what cpp_extension asks first
    compiler.write_text(f'#!/bin/sh\n{version}\necho "blocksparse_cpu.cpp:1:1: error: no room on the device" >&2\nexit 1\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv(build.CACHE_VARIABLE, str(tmp_path / "cache"))
    build.load.cache_clear()
    request.addfinalizer(build.load.cache_clear)
    with pytest.warns(
        UserWarning, match="unavailable \\(blocksparse_cpu.cpp:1:1: error: no room on the device\\); using the pieces"
    ):
        assert not build.load()


def logging_compiler(folder: Path) -> tuple[Path, Path]:
    """A ``g++`` that logs each call (its pid and arguments) and runs ``c++``; with HANG set, a compile hangs instead."""
    log, compiler = folder / "calls.log", folder / "g++"
    hang = 'if [ -n "$HANG" ]; then case "$*" in *" -c "*) exec sleep 600;; esac; fi'
    compiler.write_text(f'#!/bin/sh\necho "$$ $*" >> {log}\n{hang}\nexec c++ "$@"\n')
    compiler.chmod(0o755)
    return compiler, log


def compiles(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if " -c " in line] if log.exists() else []


def python(code: str, env: dict, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, **options)


@pytest.mark.slow
def test_processes_started_at_once_share_one_build(tmp_path):
    """Three processes at once on an empty cache (a run's ranks, or runs started together): one compiles, all load;
    a fourth finds the build and compiles nothing."""
    compiler, log = logging_compiler(tmp_path)
    env = {**os.environ, "CXX": str(compiler), build.CACHE_VARIABLE: str(tmp_path / "cache")}
    processes = [python(LOADED, env) for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], errors
    assert len(compiles(log)) == 1 and sum("-shared" in line for line in log.read_text().splitlines()) == 1
    assert sum(e.count("building the C++ CPU attention kernel") for e in errors) == 1

    fourth = python(LOADED, env)
    error = fourth.communicate(timeout=300)[1]
    assert fourth.returncode == 0 and "building" not in error and len(compiles(log)) == 1, error


@pytest.mark.slow
def test_a_build_killed_halfway_is_finished_by_the_next_process(tmp_path):
    """SIGKILL in the middle of a compile: the lock dies with its holder (torch 2.11's lock file is left behind), and
    the next process builds and loads instead of waiting forever."""
    compiler, log = logging_compiler(tmp_path)
    env = {**os.environ, "CXX": str(compiler), build.CACHE_VARIABLE: str(tmp_path / "cache")}
    killed = python(LOADED, {**env, "HANG": "1"}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not compiles(log) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert compiles(log), "the first process never reached its compile"
    hung = int(compiles(log)[0].split()[0])  # ninja runs each command in a process group of its own
    try:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGKILL)
    nxt = python(LOADED, env)
    error = nxt.communicate(timeout=300)[1]
    assert nxt.returncode == 0 and "building the C++ CPU attention kernel" in error, error
    assert len(compiles(log)) == 2
