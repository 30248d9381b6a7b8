"""The error `btrm` reports in one line (exit code 2) instead of a traceback: see `btrm.cli.main`."""


class UserError(Exception):
    """A mistake in what the user gave (a flag, a file, a row, a field): the message names it and the fix."""
