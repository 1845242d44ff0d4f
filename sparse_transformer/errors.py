"""Errors caused by what a user gave (config, data, checkpoint), shown as one line without a traceback."""

import sys
from collections.abc import Callable


class InputError(Exception):
    """Bad input from the user; the CLIs print ``error: <message>`` and exit with status 2."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point, turning an InputError into one ``error:`` line and exit status 2."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
