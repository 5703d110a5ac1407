"""Exit codes of the `harness` command, pinned by a test."""

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2  # bad usage or bad input (inventory, plan, flags)
    PARTIAL = 3  # some devices or jobs failed; the others' results are kept
    INTERRUPTED = 130
