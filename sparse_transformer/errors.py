"""Errors caused by what a user gave (config, data, checkpoint), shown as one line without a traceback."""


class InputError(Exception):
    """Bad input from the user; the CLIs print ``error: <message>`` and exit with status 2."""
