"""Errors caused by what a user gave (config, data, checkpoint), shown as one line without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(Exception):
    """Bad input from the user; the CLIs print ``error: <message>`` and exit with status 2."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point, turning an InputError into one ``error:`` line and exit status 2.

    The InputError may arrive wrapped: jsonargparse re-raises what a DataModule's constructor refuses as
    its own error, with ours as the cause.
    """
    try:
        main()
    except Exception as e:
        cause = input_error(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def input_error(error: BaseException) -> InputError | None:
    """The InputError in ``error``'s chain of causes, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
