"""Errors of the host side; the CLI prints them as one line."""


class HarnessError(RuntimeError):
    """A failure that stops the command (exit 1)."""


class HarnessUsageError(HarnessError, ValueError):
    """Bad input: the message names the file, field and value (exit 2)."""


class DeviceUnreachable(HarnessError):
    """A device could not be reached or authenticated before a job started; skip it."""


class DeviceLost(HarnessError):
    """A device went away while a job ran (connection dropped); the job may be retried."""
