"""A failure on one rank ends every rank of the run within seconds, each with the same one-line error.

Lightning sets up the process group inside ``fit``. A rank that stops before it (a checkpoint missing from a
node's own disk, a missing data file) or after it leaves the other ranks waiting at the next rendezvous or
collective: 30 minutes, by default. So every process of a multi-process run watches one key in the run's
TCP store, the one ``torch.distributed`` rendezvous on (``MASTER_ADDR:MASTER_PORT``, through torch's public
``TCPStore``); a process that stops on an error writes its line there first, and every other process prints
that line and exits with status 2. A process that finds the main port taken (``NODE_RANK`` given twice, or
two runs on one port) reports that the same way. Where the store is not up yet because rank 0 itself failed
early, rank 0 serves the key for a few seconds before it exits, so the others still read it.

A process that dies without a word (killed, out of memory, its node gone) cannot write its line, so in
training every rank also beats: it counts up a key of its own in the store, and watches the next rank's
(rank 3 watches rank 4, the last watches rank 0: one reader per key however many ranks). A count that stops
for ``LOST_SECONDS`` is written as that rank's line; a store that closes (it lives in rank 0's process, or in
node 0's torchrun agent) or stops answering for as long ends each rank the same way. gloo notices a dead peer
sooner, in the next collective; a rank whose collective failed so waits for the watch's verdict instead of
printing gloo's traceback. Rank 0 also writes the world size it was launched for; a rank launched for another
(nodes given different ``--trainer.num_nodes`` or ``--trainer.devices``, which would otherwise wait in the
rendezvous for ranks that never come) writes its line.

The watch's thread starts only once Lightning's launcher is done with the process (``start_once_launched``). The
launcher adds variables to the environment (``MASTER_ADDR``, ``LOCAL_RANK``, ``OMP_NUM_THREADS``...) and starts the
other local ranks; C's ``setenv`` may move the environment's array while another thread reads it (``getenv``, as
torch's store client and the resolver may while connecting), and such a read is a segfault. The launching process
of a 2-rank run died so twice in about a hundred such runs in the test suite (SIGSEGV, before it started rank 1,
with the watch its only other thread); in a few hundred runs alone it never did, so that this is the cause is an
inference from where it died, and the order now leaves the launcher's work to one thread whatever the cause was.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import Strategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from torch.distributed import TCPStore

KEY = "sparse_transformer/error"
BEAT = "sparse_transformer/beat/"  # + the rank: its heartbeat count
WORLD = "sparse_transformer/world_size"  # the world size rank 0 was launched for
FINISHED = 1 << 40  # added to a rank's count when it stops watching normally: no longer a sign of life to wait for
POLL_SECONDS = 0.5
LOST_SECONDS = 10.0  # a rank silent this long is taken for dead (a GIL-holding step still beats every few ms)
SERVE_SECONDS = 10.0  # how long a failing rank 0 keeps its store up for the others to read the error


class FailureWatch:
    """Watches the run's store for another rank's error (a daemon thread) and reports this rank's own.

    Args:
        address, port: the run's store (``MASTER_ADDR``, ``MASTER_PORT``).
        rank: this process in lines: "rank 3", or "node 1" before ranks exist.
        ranks: (this rank, the world size) to beat, watch the next rank's beat and check the world size
            against rank 0's; None: errors only.
        cleanup: what this process undoes before the watch ends it (``os._exit`` skips every ``finally``): the
            run folder's lock, and the folders a refused start made.
    """

    def __init__(
        self, address: str, port: int, rank: str, ranks: tuple[int, int] | None = None, cleanup: Callable[[], None] | None = None
    ):
        self.address, self.port, self.rank, self.ranks, self.cleanup = address, port, rank, ranks, cleanup
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="failure-watch", daemon=True)

    def start(self) -> FailureWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching; waits for the thread, whose store connection must not outlive the interpreter."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        store, answered, peer = None, None, _Peer()
        while not self._stop.is_set():
            try:
                store = store or self._client()
                if store.check([KEY]):
                    self._exit(store.get(KEY).decode())
                if self.ranks is not None:
                    self._beat(store, peer)
                answered = time.monotonic()
            except Exception:  # the store is not up yet: try again; or it was, and its process is gone
                store = None
                if answered is not None:
                    self._exit(
                        f"{self.rank}: the run's store at {self.address}:{self.port} closed: rank 0 or node 0 stopped "
                        "(killed, out of memory, or its node went down)"
                    )
            self._stop.wait(POLL_SECONDS)
        if store is not None and self.ranks is not None:
            try:
                store.add(f"{BEAT}{self.ranks[0]}", FINISHED)
            except Exception:
                pass

    def _beat(self, store: TCPStore, peer: _Peer) -> None:
        """Count this rank's beat; write the next rank's line once its count stayed still for ``LOST_SECONDS``, and
        this rank's if it was launched for another world size than rank 0."""
        me, world = self.ranks
        if not peer.world_checked:
            peer.world_checked = self._check_world(store)
        store.add(f"{BEAT}{me}", 1)
        nxt = (me + 1) % world
        if nxt == me:
            return
        count, now = store.add(f"{BEAT}{nxt}", 0), time.monotonic()
        if count != peer.count or count == 0 or count >= FINISHED:  # alive, not started yet, or finished
            peer.count, peer.since = count, now
        elif now - peer.since > LOST_SECONDS:
            self._tell(store, f"rank {nxt}: stopped without a word for {LOST_SECONDS:g} s (killed, out of memory, or its "
                              "node went down); every rank stops")  # fmt: skip

    def _check_world(self, store: TCPStore) -> bool:
        """Whether this rank's world size is written (rank 0) or compared with rank 0's (False: not there yet)."""
        me, world = self.ranks
        if me == 0:
            store.set(WORLD, str(world))
            return True
        if not store.check([WORLD]):
            return False
        theirs = int(store.get(WORLD))
        if theirs != world:
            self._tell(store, f"rank {me}: launched as one of {world} processes, and rank 0 as one of {theirs} (processes "
                              "= --trainer.num_nodes x --trainer.devices); give every node the same num_nodes and devices")  # fmt: skip
        return True

    def _tell(self, store: TCPStore, line: str) -> None:
        """End every rank with ``line``: this one now, the others when they read it."""
        store.set(KEY, line)
        self._exit(line)

    def _exit(self, line: str) -> None:
        if self._stop.is_set():
            return
        print(f"error: {line}", file=sys.stderr, flush=True)
        if self.ranks is not None and self.ranks[0] == 0:
            time.sleep(3 * POLL_SECONDS)  # rank 0's process may hold the store: the others read the line first
        try:
            if self.cleanup is not None:
                self.cleanup()
        finally:
            os._exit(2)

    def await_verdict(self) -> None:
        """Give the watch the time to name a rank that died (the caller's collective failed for it): the watch ends
        this process with that line, or this returns after ``LOST_SECONDS`` and a little more."""
        if self.ranks is not None and self._thread.is_alive():
            self._thread.join(timeout=LOST_SECONDS + 4 * POLL_SECONDS)

    def _client(self, seconds: float = LOST_SECONDS) -> TCPStore:
        return TCPStore(self.address, self.port, is_master=False, timeout=timedelta(seconds=seconds), wait_for_workers=False)

    def report(self, message: str) -> str:
        """Tell every other rank this one failed with ``message``; returns the line they print."""
        self.stop()
        line = f"{self.rank}: {message}"
        store = in_time(lambda: self._client(seconds=5.0), seconds=7.0)
        if store is None:  # no store to reach: rank 0 failed before serving one, or another program holds the port
            if self.rank not in ("rank 0", "node 0"):
                return line
            try:
                store = TCPStore(self.address, self.port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
            except Exception:
                return line
            store.set(KEY, line)
            time.sleep(SERVE_SECONDS)
            return line
        store.set(KEY, line)
        return line


def in_time(make: Callable[[], TCPStore], seconds: float) -> TCPStore | None:
    """``make()`` in a thread of its own, or None if it failed or did not return within ``seconds``: a store client
    connected to a port that another program holds waits for an answer past its own timeout."""
    made: list[TCPStore] = []

    def run() -> None:
        try:
            made.append(make())
        except Exception:
            pass

    thread = threading.Thread(target=run, name="store-client", daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    return made[0] if made else None


class _Peer:
    """The next rank's beat count as last read, and since when it has not changed; whether the world size was checked."""

    def __init__(self):
        self.count, self.since, self.world_checked = 0, time.monotonic(), False


def start_once_launched(watch: FailureWatch, strategy: Strategy) -> None:
    """Start ``watch`` when ``strategy``'s launcher calls the training function: after it set this process's
    environment and started the other local ranks, before the rendezvous, in which a watch is needed to hear of a
    rank that failed before it. A launcher that runs the function in other processes (spawn) gets it started now."""
    launcher = strategy.launcher
    if not isinstance(launcher, _SubprocessScriptLauncher):
        watch.start()
        return
    launch = launcher.launch

    def launch_then_watch(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def watched(*inner: Any, **named: Any) -> Any:
            watch.start()
            return function(*inner, **named)

        return launch(watched, *args, **kwargs)

    launcher.launch = launch_then_watch


def watch_from_environment() -> FailureWatch | None:
    """A watch for a process of a multi-node run that failed before Lightning set up its ranks, from the
    variables such a run is launched with (``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` or ``RANK``)."""
    env = os.environ
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env or not ({"NODE_RANK", "RANK"} & env.keys()):
        return None
    rank = f"rank {env['RANK']}" if "RANK" in env else f"node {env['NODE_RANK']}"
    return FailureWatch(env["MASTER_ADDR"], int(env["MASTER_PORT"]), rank)


def port_taken(error: BaseException, address: str, port: int, rank: str) -> str | None:
    """The one-line message for torch's "address already in use" at the rendezvous, or None for other errors."""
    text = str(error)
    if "EADDRINUSE" not in text and "address already in use" not in text.lower():
        return None
    return (
        f"the main port {address}:{port} is taken, so this process cannot be {rank}: another process already "
        "runs it there (NODE_RANK given twice?), or pick another MASTER_PORT"
    )


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another process of the run is gone (gloo's words)."""
    text = str(error)
    return any(words in text for words in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 of its run, from the variables it was launched with, before Lightning
    sets up ranks: ``RANK`` (torchrun); else not if ``LOCAL_RANK`` or ``NODE_RANK`` is set and not 0 (Lightning's
    own launcher starts ranks 1.. of a node with ``LOCAL_RANK`` set); else ``SLURM_PROCID`` (srun), if any."""
    env = os.environ
    if "RANK" in env:
        return env["RANK"] == "0"
    if env.get("LOCAL_RANK", "0") != "0" or env.get("NODE_RANK", "0") != "0":
        return False
    return env.get("SLURM_PROCID", "0") == "0"
