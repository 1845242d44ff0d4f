"""Datasets fetched whole or not at all, for the commands that download them (enwik8, CIFAR-10).

:func:`prepare` makes one dataset, a file or a folder ``target`` unpacked from one archive at a URL:

- Complete already: ``check(target)`` says it is there and whole; nothing is fetched, and the command says so.
- Held: one process at a time prepares data in a folder (``flock`` on ``<folder>/.download.lock``). A second
  one says whom it waits for, waits, and then finds the data complete. The kernel releases a killed holder's lock.
- Room: the folder must have room for the rest of the archive and what it unpacks to, before a byte is fetched.
- Downloaded into ``<folder>/<archive>.part`` with a progress line (bytes, rate, time left; a plain line every
  ``PLAIN_EVERY`` seconds when stderr is not a terminal). A ``.part`` already there is resumed with an HTTP
  Range request, and restarted when the server ignores Range. Every read has a timeout, so a stalled connection
  ends; a connection that breaks or stalls is resumed up to ``ATTEMPTS`` times in one command, and after that
  the ``.part`` is kept for the next command to resume. A ``.part`` whose disk filled is removed instead (it
  gives the space back; the message says how much the download needs).
- Verified: the whole archive's size and checksum, before anything is unpacked. A wrong one is removed, since
  resuming it cannot mend it.
- Unpacked into ``<folder>/.<target>.<random>.tmp``, checked, and renamed over ``target``; the ``.part`` is then
  removed. A temporary folder a killed unpack left is removed by the next command.

Every failure is one line (an :class:`InputError`) naming the URL or file and what to do; Ctrl-C is one line
(:class:`Interrupted`) saying what is kept for the next command.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sparse_transformer.errors import InputError, Interrupted
from sparse_transformer.files import FolderLock, TEMPORARY_SUFFIX, check_folder, check_room
from sparse_transformer.terminal import StatusLine, clock

TIMEOUT = 60.0  # seconds without a byte before a connection counts as stalled
ATTEMPTS = 3  # connections per command before a broken download is left for the next command to resume
RETRY_PAUSE = 2.0  # seconds before the next connection
PLAIN_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal
CHUNK = 1 << 16  # bytes per read
PART = ".part"
LOCK = ".download.lock"
USER_AGENT = "sparse-transformer"
MB = 1e6


@dataclass(frozen=True)
class Remote:
    """An archive to download: its URL, its size in bytes and its published checksum, ``"<hashlib name>:<hex>"``."""

    url: str
    size: int
    checksum: str

    @property
    def name(self) -> str:
        return PurePosixPath(urllib.parse.urlsplit(self.url).path).name


def prepare(
    remote: Remote,
    target: Path,
    check: Callable[[Path], bool],
    unpacked_size: int,
    by_hand: str,
    timeout: float = TIMEOUT,
) -> Path:
    """Make ``target`` from ``remote``, the member of the archive named as ``target`` is, unless it is complete.

    Args:
        check: True when a path holds the complete dataset, False when nothing is there; raises an
            :class:`InputError` (saying what to do) for something there that is not the dataset.
        unpacked_size: bytes the dataset takes unpacked, for the room check.
        by_hand: what a user can do without this command, ending every message of a download that failed.
        timeout: seconds without a byte before a connection counts as stalled.
    """
    target = Path(target)
    if check(target):
        print(f"{target} is complete already: nothing to download")
        return target
    with DataLock(target.parent):
        if check(target):  # another process made it while this one waited
            print(f"{target} is complete already (another process downloaded it): nothing to download")
            return target
        for stale in target.parent.glob(f".{target.name}.*{TEMPORARY_SUFFIX}"):  # a killed unpack's, as we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        part = target.parent / (remote.name + PART)
        kept = part.stat().st_size if part.is_file() else 0
        needs = max(remote.size - kept, 0) + unpacked_size
        check_room(target.parent, "data folder", needs, f"{remote.name} and what it unpacks to")
        download(remote, part, by_hand, timeout)
        _unpack(remote, part, target, check, by_hand)
        part.unlink()
    print(f"wrote {target}")
    return target


def download(remote: Remote, part: Path, by_hand: str, timeout: float = TIMEOUT) -> None:
    """Fetch ``remote`` into ``part`` (resuming what it holds) and verify its size and checksum."""
    if part.is_file() and part.stat().st_size > remote.size:
        part.unlink()  # not a beginning of this archive
    status = StatusLine(every=PLAIN_EVERY)
    started, first = time.monotonic(), _size(part)
    if first < remote.size:
        doing = f"resuming at {first / MB:.1f} MB" if first else f"{remote.size / MB:.1f} MB"
        status.print(f"downloading {remote.url} into {part} ({doing})")
    try:
        for attempt in range(1, ATTEMPTS + 1):
            if _size(part) >= remote.size:
                break
            try:
                _fetch(remote, part, by_hand, timeout, status)
            except _Broken as e:
                have = _size(part)
                if attempt == ATTEMPTS:
                    raise InputError(
                        f"download of {remote.url} failed {ATTEMPTS} times (last: {e}); {part} keeps {have / MB:.1f} "
                        f"of {remote.size / MB:.1f} MB: run the command again to resume, or {by_hand}"
                    ) from e
                status.print(f"{remote.url}: {e} at {have / MB:.1f} MB; resuming (try {attempt + 1} of {ATTEMPTS})")
                time.sleep(RETRY_PAUSE)
    except KeyboardInterrupt:
        raise Interrupted(
            f"download of {remote.url} interrupted; {part} keeps {_size(part) / MB:.1f} of {remote.size / MB:.1f} MB: "
            "run the command again to resume",
            signal.SIGINT,
        ) from None
    seconds = time.monotonic() - started
    if _size(part) > first:
        rate = (_size(part) - first) / max(seconds, 1e-9)
        status.print(f"downloaded {remote.url}: {remote.size / MB:.1f} MB in {clock(seconds)} ({rate / MB:.1f} MB/s)")
    algorithm, expected = remote.checksum.split(":")
    digest = file_checksum(part, algorithm)
    if digest != expected:
        part.unlink()
        raise InputError(
            f"{remote.url} gave a file whose {algorithm} is {digest}, not the published {expected}; removed it: run "
            f"the command again, or {by_hand}"
        )


def file_checksum(path: Path, algorithm: str) -> str:
    """The hex digest of a file's bytes (``algorithm``: a hashlib name such as md5 or sha256)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


class _Broken(Exception):
    """A connection that stalled, broke off or refused to resume: the next attempt resumes it."""


class _TooLong(Exception):
    """More bytes than the archive has: another file."""


def _fetch(remote: Remote, part: Path, by_hand: str, timeout: float, status: StatusLine) -> None:
    """One connection: append to ``part`` from where it ends (from 0 if the server will not resume)."""
    have = _size(part)
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(remote.url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # Range Not Satisfiable: the server's file is not what the part began
            part.unlink()
            raise _Broken(f"the server cannot resume at {have / MB:.1f} MB, so the download starts again") from e
        advice = "try again later" if e.code >= 500 else "the file may have moved"
        raise InputError(f"cannot download {remote.url}: HTTP {e.code} {e.reason}; {advice}, or {by_hand}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise _Broken(f"no answer in {timeout:g} s") from e
        reason = getattr(e.reason, "strerror", None) or e.reason  # "Name or service not known", not "[Errno -2] ..."
        raise InputError(f"cannot reach {remote.url} ({reason}); check the network, or {by_hand}") from e
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Broken(_why(e, timeout)) from e
    with response:
        start, total = _where(response, have)
        if start != have:
            if start != 0:  # an answer to a resume at another place: its bytes cannot be appended
                part.unlink()
                raise _Broken(f"the server resumed at byte {start}, not {have}")
            if have:
                status.print(f"{remote.url} does not resume downloads: starting again")
            have = 0
        if total is not None and total != remote.size:
            raise InputError(
                f"{remote.url} serves {total} bytes, {remote.name} has {remote.size}: the file there changed; {by_hand}"
            )
        _receive(response, remote, part, have, by_hand, timeout, status)


def _where(response: http.client.HTTPResponse, have: int) -> tuple[int, int | None]:
    """Where the response's bytes begin in the file, and the file's size if the server says it."""
    length = response.headers.get("Content-Length")
    if response.status != 206:
        return 0, int(length) if length is not None else None
    span = response.headers.get("Content-Range", "")  # "bytes 100-199/200"
    try:
        first, size = span.split(" ", 1)[1].split("-", 1)[0], span.rsplit("/", 1)[1]
        return int(first), int(size) if size != "*" else None
    except (IndexError, ValueError):
        return -1, None  # unreadable: treated as a resume at another place


def _receive(
    response: http.client.HTTPResponse, remote: Remote, part: Path, have: int, by_hand: str, timeout: float, status: StatusLine
) -> None:
    started, first = time.monotonic(), have
    try:
        with open(part, "ab" if have else "wb") as f:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (TimeoutError, ConnectionError, http.client.HTTPException) as e:  # no OSError reaches the file's handler
                    raise _Broken(_why(e, timeout)) from e
                if not chunk:
                    break
                f.write(chunk)
                have += len(chunk)
                if have > remote.size:
                    raise _TooLong()
                if status.due():
                    rate = (have - first) / max(time.monotonic() - started, 1e-9)
                    left = clock((remote.size - have) / rate) if rate > 0 else "?"
                    tail = f"{have / MB:.1f} of {remote.size / MB:.1f} MB  {rate / MB:.1f} MB/s  {left} left"
                    status.update(f"downloading {remote.name}", tail, have / remote.size)
    except OSError as e:  # the file's: a full disk, a quota, a folder gone read-only
        part.unlink(missing_ok=True)
        raise InputError(
            f"cannot write {part} ({os.strerror(e.errno) if e.errno else e}) at {have / MB:.1f} of {remote.size / MB:.1f} "
            f"MB; removed it: free {remote.size / MB:.0f} MB and more for unpacking in {part.parent}, and run the command again"
        ) from e
    except _TooLong:
        part.unlink()
        raise InputError(
            f"{remote.url} sent more than the {remote.size} bytes of {remote.name}: the file there changed; removed "
            f"{part}; {by_hand}"
        ) from None
    finally:
        status.clear()
    if have < remote.size:
        raise _Broken(f"the connection closed after {have / MB:.1f} of {remote.size / MB:.1f} MB")


def _why(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):  # socket.timeout too
        return f"no data for {timeout:g} s"
    detail = f": {error}" if str(error) else ""
    return f"the connection broke ({type(error).__name__}{detail})"


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _unpack(remote: Remote, archive: Path, target: Path, check: Callable[[Path], bool], by_hand: str) -> None:
    """Unpack the member ``target.name`` of ``archive`` beside ``target``, check it and rename it into place."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX))
    try:
        print(f"unpacking {archive.name} ...", file=sys.stderr)
        extract(archive, target.name, tmp)
        try:
            complete = check(tmp / target.name)
        except InputError:
            complete = False
        if not complete:
            raise InputError(f"{remote.url} passed its checksum but holds no complete {target.name}; {by_hand}")
        os.replace(tmp / target.name, target)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        reason = os.strerror(e.errno) if getattr(e, "errno", None) else e
        advice = "free some space and run the command again" if full else f"run the command again, or {by_hand}"
        raise InputError(f"cannot unpack {archive} into {target.parent} ({reason}); it is kept: {advice}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract(archive: Path, member: str, into: Path) -> None:
    """Extract ``member`` (a file, or a folder and what is under it) of a zip or tar archive into ``into``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n == member or n.startswith(member + "/")]
            z.extractall(into, members=names)
        return
    with tarfile.open(archive) as t:
        members = [m for m in t.getmembers() if m.name == member or m.name.startswith(member + "/")]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # refuses links out and absolute paths
        t.extractall(into, members=members, **safe)


class DataLock:
    """One process at a time preparing data in ``folder`` (``files.FolderLock``): a second one waits, saying for whom."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.lock = FolderLock(self.folder, LOCK, "data folder")

    def __enter__(self) -> DataLock:
        check_folder(self.folder, "data folder")
        self.lock.take(lambda holder: print(f"waiting for {holder}, which is preparing data in {self.folder} ...", file=sys.stderr))
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
