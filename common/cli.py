"""What every ``exegpt`` command shares, whichever layer defines it: the one-line user error."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing error: the command line prints it as one line and exits with status 2."""
