"""How commands end when they cannot go on: one line, no traceback, and an exit status that says why."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(Exception):
    """Bad input from the user; the CLIs print ``error: <message>`` and exit with status 2."""


class Interrupted(BaseException):
    """A signal stopped the command; the CLIs print ``stopped: <message>`` (on rank 0) and exit with 128 + the
    signal's number, as a shell reports a process the signal ended. A BaseException, as KeyboardInterrupt is, so
    that no ``except Exception`` on the way out (a file reader's, Lightning's) takes it for an error."""

    def __init__(self, message: str, signum: int, show: bool = True):
        super().__init__(message)
        self.signum, self.show = signum, show


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point, turning an InputError or Interrupted into one line and its exit status.

    The InputError may arrive wrapped: jsonargparse re-raises what a DataModule's constructor refuses as its
    own error, and a DataLoader worker's error comes back with the worker's traceback in its message.
    """
    try:
        main()
    except Interrupted as e:
        if e.show:
            print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except Exception as e:
        cause = input_error(e)
        if cause is None:
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr)
        sys.exit(2)


def input_error(error: BaseException | None) -> InputError | None:
    """The InputError in ``error``'s chain of causes, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def one_line(error: InputError) -> str:
    """The message; for an error raised in a DataLoader worker, which PyTorch re-raises with the worker's
    traceback as its message, the original message on the traceback's last line."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)


def plural(n: int, noun: str) -> str:
    """``plural(1, "image")`` is "1 image", ``plural(2, "image")`` "2 images"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
