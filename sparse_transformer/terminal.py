"""What a long command shows while it works, on stderr: one line rewritten in place on a terminal, or plain
lines a fixed interval apart when stderr is a file or a pipe (a job's log, ``2>&1 | tee``), so a log shows
progress without a line per refresh. ``train.py`` and ``sample.py`` both report through it.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
import warnings
from typing import TextIO

REFRESH = 0.25  # seconds between rewrites of the line on a terminal

# Third-party output a normal run does not need, each silenced by its message only.
QUIET_WARNINGS = (
    # torch 2.11 deprecates a check Lightning 2.6 makes (lightning/pytorch/utilities/_pytree.py), every run.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # The run folder's checkpoints/ on resume: RunCheckpoint already refuses another run's (training/run.py).
    (UserWarning, r"Checkpoint directory .* exists and is not empty"),
    # Lightning cannot see that our training sampler resumes mid-epoch (data/training_order.py); it does.
    (UserWarning, r"You're resuming from a checkpoint that ended before the epoch ended"),
    # FSDP2 (training/fsdp2.py) on the model's logits, a slice: the loss reads them out of place, as it must.
    (UserWarning, r"FSDP2-wrapped module \(FSDPSparseTransformer\) returned a view tensor"),
)
QUIET_INFO = (
    "💡 Tip:",  # advertisements for Lightning's cloud services (litlogger, litmodels)
    "`Trainer.fit` stopped:",  # the run's summary line says where it stopped (training/progress.py)
    "Trainer already configured with model summary callbacks",  # ours, RunSummary: one line, not a table
    "TPU available: False",
    "HPU available: False",
)


class StatusLine:
    """One line of progress.

    On a terminal ``update`` rewrites the line at most every ``REFRESH`` seconds, cut to the terminal's width,
    with a bar where there is room; elsewhere it prints the line as it is, at most every ``every`` seconds.
    ``print`` writes a line that stays (and clears the status first, so the two never share a line).

    Args:
        every: seconds between plain lines when the stream is not a terminal.
        stream: where to write (default: stderr, so stdout keeps only results).
    """

    def __init__(self, every: float = 30.0, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every
        self.last = -math.inf  # when a line was last written
        self.showing = False  # a live line is on the screen
        encoding = (getattr(self.stream, "encoding", None) or "").lower().replace("-", "")
        self.bar_chars = ("━", "─") if encoding == "utf8" else ("#", "-")

    def due(self) -> bool:
        """Whether ``update`` would write now: callers skip building the text (and reading metrics) otherwise."""
        return time.monotonic() - self.last >= (REFRESH if self.live else self.every)

    def update(self, head: str, tail: str = "", fraction: float | None = None, force: bool = False) -> None:
        """Show ``head``, a bar at ``fraction`` (0 to 1; live only, where it fits) and ``tail``."""
        if not (force or self.due()):
            return
        self.last = time.monotonic()
        if not self.live:
            share = f" ({fraction:.0%})" if fraction is not None else ""
            self._write(f"{head}{share}  {tail}".rstrip() + "\n")
            return
        width = shutil.get_terminal_size((80, 24)).columns - 1  # the last column would wrap on some terminals
        room = width - len(head) - len(tail) - 2
        line = f"{head}  {tail}"
        if fraction is not None and room >= 8:
            size = min(room - 6, 30)
            filled = round(min(max(fraction, 0.0), 1.0) * size)
            bar = self.bar_chars[0] * filled + self.bar_chars[1] * (size - filled)
            line = f"{head} {bar} {fraction:4.0%}  {tail}"
        self._write("\r" + line[:width] + "\x1b[K")
        self.showing = True

    def print(self, text: str) -> None:
        """A line that stays: in the terminal's scrollback, or in the log."""
        self.clear()
        self._write(text + "\n")

    def clear(self) -> None:
        """Take the live line off the screen, so what is written next starts on a clean line."""
        if self.showing:
            self._write("\r\x1b[K")
            self.showing = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def clock(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def quiet_third_party() -> None:
    """Silence the warnings and Lightning info lines above, by message; everything else still shows."""
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # every rank_zero_info of Lightning
    if not any(isinstance(f, _DropInfo) for f in logger.filters):
        logger.addFilter(_DropInfo())


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_INFO)
