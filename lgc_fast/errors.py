"""Errors meant for the person at the keyboard: the CLI prints them as one line, without a traceback."""


class LgcError(ValueError):
    """Bad input that a user can fix (a file, an argument, a flag). The message names it."""
