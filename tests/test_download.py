"""Dataset downloads (data/download.py) for enwik8 and CIFAR-10, against a local HTTP server the tests start.

The server serves small generated archives in the datasets' shapes (never the real ones) and misbehaves on
request, by the first part of the URL's path: ``ok``, ``cut`` (every response stops halfway), ``cut-once``,
``stall`` (half, then silence), ``norange`` (ignores Range) and ``gate`` (waits for the test to let it answer).
"""

from __future__ import annotations

import errno
import hashlib
import io
import random
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import sparse_transformer.data.download as download
import sparse_transformer.data.images as images
import sparse_transformer.data.text as text
from sparse_transformer.data.download import Remote
from sparse_transformer.errors import InputError, Interrupted, run_cli

STALL = 0.2  # the tests' timeout: seconds without a byte before a connection counts as stalled


class Server:
    """``files`` by name, at ``http://127.0.0.1:<port>/<mode>/<name>``; ``requests`` records (mode, name, Range)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.release = threading.Event()  # ends the stalls (at teardown) and opens the gate
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                mode, _, name = self.path.strip("/").partition("/")
                owner.requests.append((mode, name, self.headers.get("Range")))
                data = owner.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range") and mode != "norange":
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                first = sum(1 for r in owner.requests if r[1] == name) == 1
                if mode == "cut" or (mode == "cut-once" and first):
                    self.wfile.write(body[: len(body) // 2])  # and the connection closes
                    return
                if mode == "stall":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    owner.release.wait(10)  # then closes: a client without a timeout sees a cut, not a stall
                    return
                if mode == "gate":
                    owner.release.wait()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True

    def url(self, mode: str, name: str) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/{mode}/{name}"


@pytest.fixture
def server():
    s = Server()
    thread = threading.Thread(target=s.http.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield s
    s.release.set()
    s.http.shutdown()
    s.http.server_close()


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr(download, "RETRY_PAUSE", 0.0)


@dataclass
class Dataset:
    """One dataset's download command, pointed at the test server by ``serve``."""

    archive: bytes  # what the server serves: a small archive in the dataset's shape
    archive_name: str
    target: str  # the file or folder the archive unpacks to
    contents: dict[str, bytes]  # what the target holds, by path under the folder
    pack: Callable[[dict[str, bytes]], bytes]  # an archive of the dataset's kind holding these
    prepare: Callable[..., Path]
    main: Callable[[list[str]], None]
    attribute: tuple[object, str]  # the module and name of its Remote

    def serve(self, monkeypatch, server: Server, mode: str = "ok", archive: bytes | None = None) -> str:
        """Serve ``archive`` (default: the true one) in ``mode``, while the command expects the true one."""
        server.files[self.archive_name] = self.archive if archive is None else archive
        url = server.url(mode, self.archive_name)
        algorithm = getattr(*self.attribute).checksum.split(":")[0]  # the one the dataset publishes
        digest = hashlib.new(algorithm, self.archive).hexdigest()
        monkeypatch.setattr(*self.attribute, Remote(url, len(self.archive), f"{algorithm}:{digest}"))
        return url

    def holds(self, root: Path) -> bool:
        return all((root / name).read_bytes() == data for name, data in self.contents.items())


def _bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _zip(contents: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in contents.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _tar(contents: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _enwik8(monkeypatch) -> Dataset:
    payload = _bytes(300_000, 0)  # several reads of download.CHUNK
    monkeypatch.setattr(text, "ENWIK8_SIZE", len(payload))
    monkeypatch.setattr(text, "ENWIK8_MD5", hashlib.md5(payload).hexdigest())
    contents = {"enwik8": payload}
    return Dataset(_zip(contents), "enwik8.zip", "enwik8", contents, _zip, text.prepare_enwik8, text.main, (text, "ENWIK8_ZIP"))


def _cifar10(monkeypatch) -> Dataset:
    files = {name: _bytes(40_000, i) for i, name in enumerate(images.CIFAR10_FILES)}
    monkeypatch.setattr(images, "CIFAR10_FILES", {name: hashlib.md5(data).hexdigest() for name, data in files.items()})
    contents = {f"cifar-10-batches-py/{name}": data for name, data in files.items()}
    archive = _tar({**contents, "cifar-10-batches-py/readme.html": b"<html></html>"})
    return Dataset(archive, "cifar-10-python.tar.gz", "cifar-10-batches-py", contents, _tar, images.prepare_cifar10,
                   lambda argv: images.main(["cifar10", *argv]), (images, "CIFAR10_TAR"))  # fmt: skip


@pytest.fixture(params=["enwik8", "cifar10"])
def dataset(request, monkeypatch) -> Dataset:
    return {"enwik8": _enwik8, "cifar10": _cifar10}[request.param](monkeypatch)


def one_line_naming(error: pytest.ExceptionInfo, *names: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)
    return message


def test_full_download_then_a_second_command_does_nothing(dataset, server, monkeypatch, tmp_path, capsys):
    url = dataset.serve(monkeypatch, server)
    root = tmp_path / "data"
    assert dataset.prepare(root) == root / dataset.target
    assert dataset.holds(root)
    assert [p.name for p in root.iterdir()] == [dataset.target]  # no .part, lock or temporary folder left
    out, err = capsys.readouterr()
    assert f"wrote {root / dataset.target}" in out
    assert f"downloading {url}" in err and "\r" not in err  # plain lines: stderr is not a terminal here
    progress = [line for line in err.splitlines() if line.startswith(f"downloading {dataset.archive_name}")]
    assert progress and "MB/s" in progress[0] and "left" in progress[0]
    asked = len(server.requests)
    dataset.prepare(root)
    assert len(server.requests) == asked
    assert "is complete already: nothing to download" in capsys.readouterr().out


def test_progress_rewrites_one_line_on_a_terminal(dataset, server, monkeypatch, tmp_path, capsys):
    class Terminal(io.StringIO):
        encoding = "utf-8"

        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    dataset.serve(monkeypatch, server)
    dataset.prepare(tmp_path)
    assert f"\rdownloading {dataset.archive_name}" in terminal.getvalue() and "MB/s" in terminal.getvalue()


def test_cut_off_halfway_resumes_in_the_same_command(dataset, server, monkeypatch, tmp_path, capsys):
    dataset.serve(monkeypatch, server, "cut-once")
    dataset.prepare(tmp_path)
    assert dataset.holds(tmp_path)
    (_, _, first), (_, _, second) = server.requests
    half = len(dataset.archive) // 2
    assert first is None and second == f"bytes={half}-"
    assert "the connection closed after" in capsys.readouterr().err


def test_cut_off_every_time_keeps_the_part_for_the_next_command(dataset, server, monkeypatch, tmp_path):
    url = dataset.serve(monkeypatch, server, "cut")
    with pytest.raises(InputError) as e:
        dataset.prepare(tmp_path)
    part = tmp_path / f"{dataset.archive_name}.part"
    one_line_naming(e, url, str(part), "run the command again to resume")
    kept = part.stat().st_size
    assert 0 < kept < len(dataset.archive)
    assert not (tmp_path / dataset.target).exists()
    dataset.serve(monkeypatch, server, "ok")
    dataset.prepare(tmp_path)
    assert server.requests[-1] == ("ok", dataset.archive_name, f"bytes={kept}-")
    assert dataset.holds(tmp_path) and not part.exists()


def test_a_server_that_ignores_range_restarts_the_download(dataset, server, monkeypatch, tmp_path, capsys):
    (tmp_path / f"{dataset.archive_name}.part").write_bytes(b"not the start of the archive")
    dataset.serve(monkeypatch, server, "norange")
    dataset.prepare(tmp_path)
    assert dataset.holds(tmp_path)
    assert "does not resume downloads: starting again" in capsys.readouterr().err


def test_a_wrong_checksum_is_refused_before_unpacking_and_removed(dataset, server, monkeypatch, tmp_path):
    corrupt = bytearray(dataset.archive)
    corrupt[len(corrupt) // 2] ^= 0xFF
    url = dataset.serve(monkeypatch, server, archive=bytes(corrupt))
    monkeypatch.setattr(download, "extract", lambda *args: pytest.fail("unpacked before the checksum was checked"))
    with pytest.raises(InputError) as e:
        dataset.prepare(tmp_path / "data")
    one_line_naming(e, url, "not the published", "removed it")
    assert not (tmp_path / "data").exists()  # the folder the command made, the .part and the lock: all gone


def test_a_file_of_another_size_is_refused_before_downloading(dataset, server, monkeypatch, tmp_path):
    url = dataset.serve(monkeypatch, server, archive=dataset.archive + b"more")
    with pytest.raises(InputError) as e:
        dataset.prepare(tmp_path / "data")
    one_line_naming(e, url, "the file there changed")
    assert not (tmp_path / "data").exists()


def test_404_is_one_line_naming_the_url(dataset, server, monkeypatch, tmp_path):
    dataset.serve(monkeypatch, server)
    server.files.clear()
    with pytest.raises(InputError) as e:
        dataset.prepare(tmp_path / "data")
    message = one_line_naming(e, server.url("ok", dataset.archive_name), "HTTP 404")
    assert "fetch" in message and str(tmp_path / "data") in message  # what to do by hand
    assert not (tmp_path / "data").exists()


def test_a_stalled_connection_times_out_and_keeps_the_part(dataset, server, monkeypatch, tmp_path):
    url = dataset.serve(monkeypatch, server, "stall")
    with pytest.raises(InputError) as e:
        dataset.prepare(tmp_path, timeout=STALL)
    part = tmp_path / f"{dataset.archive_name}.part"
    one_line_naming(e, url, f"no data for {STALL:g} s", "run the command again to resume")
    assert len(server.requests) == download.ATTEMPTS
    assert 0 < part.stat().st_size < len(dataset.archive) and not (tmp_path / dataset.target).exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(dataset, server, monkeypatch, tmp_path):
    class FullDisk(io.FileIO):
        def write(self, data):
            if self.tell() > 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(download, "open", lambda path, mode: FullDisk(path, mode.replace("b", "")), raising=False)
    dataset.serve(monkeypatch, server)
    with pytest.raises(InputError) as e:
        dataset.prepare(tmp_path / "data")
    one_line_naming(e, f"{dataset.archive_name}.part", "No space left on device", "removed it", "free")
    assert not (tmp_path / "data").exists()


def test_ctrl_c_keeps_the_part_and_says_so(dataset, server, monkeypatch, tmp_path):
    class Interrupting(io.FileIO):
        def write(self, data):
            if self.tell() > 0:
                raise KeyboardInterrupt
            return super().write(data)

    monkeypatch.setattr(download, "open", lambda path, mode: Interrupting(path, mode.replace("b", "")), raising=False)
    dataset.serve(monkeypatch, server)
    with pytest.raises(Interrupted, match="interrupted; .*part keeps .* MB: run the command again to resume"):
        dataset.prepare(tmp_path)
    assert (tmp_path / f"{dataset.archive_name}.part").stat().st_size > 0


def test_two_downloads_into_one_folder_at_once(dataset, server, monkeypatch, tmp_path, capsys):
    dataset.serve(monkeypatch, server, "gate")
    errors = []

    def run():
        try:
            dataset.prepare(tmp_path)
        except Exception as e:  # reported below, on the test's thread
            errors.append(e)

    first = threading.Thread(target=run)
    first.start()
    deadline = time.monotonic() + 30  # a guard against hanging, not a measurement
    while not server.requests:  # the first holds the folder and is downloading
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = threading.Thread(target=run)
    second.start()
    err = ""
    while "waiting for process" not in err:  # the second waits for it
        assert time.monotonic() < deadline and second.is_alive(), err
        err += capsys.readouterr().err
        time.sleep(0.01)
    server.release.set()
    first.join()
    second.join()
    assert not errors
    assert len(server.requests) == 1 and dataset.holds(tmp_path)
    assert "another process downloaded it" in capsys.readouterr().out


@pytest.mark.parametrize("fault", ["no dataset", "part of one", "full disk"])
def test_a_failed_unpack_leaves_nothing_unpacked(dataset, server, monkeypatch, tmp_path, fault):
    (tmp_path / f".{dataset.target}.killed.tmp").mkdir()  # what an unpack killed midway left: the next removes it
    contents = dict(dataset.contents)
    if fault == "no dataset":
        contents = {"something-else": b"bytes"}
    if fault == "part of one":
        last = list(contents)[-1]
        contents[last] = contents[last][:-1]
    if fault == "full disk":
        extract = download.extract

        def extract_until_full(archive: Path, member: str, into: Path) -> None:
            extract(archive, member, into)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(download, "extract", extract_until_full)
    dataset.archive = dataset.pack(contents)  # the checksum the command expects is this archive's
    url = dataset.serve(monkeypatch, server)
    with pytest.raises(InputError) as e:
        dataset.prepare(tmp_path)
    if fault == "full disk":
        one_line_naming(e, f"{dataset.archive_name}.part", "No space left on device", "free some space")
    else:
        one_line_naming(e, url, f"holds no complete {dataset.target}")
    assert [p.name for p in tmp_path.iterdir()] == [f"{dataset.archive_name}.part"]  # verified, kept; nothing unpacked


def test_data_that_is_there_but_wrong_is_refused_not_replaced(dataset, server, monkeypatch, tmp_path):
    dataset.serve(monkeypatch, server)
    first = tmp_path / next(iter(dataset.contents))  # enwik8 itself, or CIFAR-10's first batch file
    first.parent.mkdir(exist_ok=True)
    first.write_bytes(b"half a dataset")
    with pytest.raises(InputError) as e:
        dataset.prepare(tmp_path)
    one_line_naming(e, str(tmp_path / dataset.target), "delete")
    assert not server.requests and first.read_bytes() == b"half a dataset"


def test_the_command_line_ends_in_one_line(dataset, server, monkeypatch, tmp_path, capsys):
    dataset.serve(monkeypatch, server)
    server.files.clear()
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: dataset.main([str(tmp_path / "data"), "--timeout", str(STALL)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2
    assert err[-1].startswith(f"error: cannot download {server.url('ok', dataset.archive_name)}: HTTP 404")


def test_cifar10_datamodule_downloads_through_it(server, monkeypatch, tmp_path):
    dataset = _cifar10(monkeypatch)
    dataset.serve(monkeypatch, server)
    images.CIFAR10DataModule(root=str(tmp_path), download=True).prepare_data()
    assert dataset.holds(tmp_path)


def test_cifar10_is_what_torchvision_reads():
    from torchvision.datasets import CIFAR10

    assert (images.CIFAR10_TAR.url, images.CIFAR10_TAR.checksum) == (CIFAR10.url, f"md5:{CIFAR10.tgz_md5}")
    assert images.CIFAR10_TAR.name == CIFAR10.filename and images.CIFAR10_FOLDER == CIFAR10.base_folder
    assert images.CIFAR10_FILES == dict(
        [*CIFAR10.train_list, *CIFAR10.test_list, (CIFAR10.meta["filename"], CIFAR10.meta["md5"])]
    )
