"""Errors of the host side; the CLI prints them as one line."""


class HarnessError(RuntimeError):
    """A failure that stops the command (exit 1)."""


class HarnessUsageError(HarnessError, ValueError):
    """Bad input: the message names the file, field and value (exit 2)."""
