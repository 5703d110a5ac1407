"""`harness`: the host command line (run, plan, data, devices, meter, dashboard, report, ...).

Each command group lives in `harness/commands/<name>.py` and exposes
`register(subparsers)`, which adds its parser(s) and sets `handler=run` where
`run(args) -> int` returns an exit code from `harness.exit_codes`.
Bad input raises `HarnessUsageError` (one line, exit 2). The host never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sqlite3
import sys
import traceback

from harness.errors import HarnessError, HarnessUsageError
from harness.exit_codes import ExitStatus

# Command modules under harness.commands, in the order --help lists them.
COMMAND_MODULES = (
    "run",
    "plan",
    "data",
    "export",
    "devices",
    "lab",
    "meter",
    "dashboard",
    "report",
    "notebook",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    parser.add_argument("--traceback", action="store_true", help="show the stack on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:  # every one exists: a module that fails to import is a bug
        importlib.import_module(f"harness.commands.{name}").register(subparsers)
    return parser


def _quiet_library_logs(show: bool) -> None:
    """paramiko logs every failed connect attempt with its traceback through logging's
    last-resort handler; the harness reports the outcome itself, in one line."""
    if not show:
        logging.getLogger("paramiko").addHandler(logging.NullHandler())
        logging.getLogger("paramiko").propagate = False


def _store_damage(exc: BaseException, where: str | None) -> str | None:
    """The one-line reason when a run store could not be read (damaged, truncated, foreign),
    whichever library raised it (sqlite3, pandas, analysis); None for anything else."""
    seen = exc
    while seen is not None:
        if isinstance(seen, sqlite3.DatabaseError) or type(seen).__name__ == "RunLoadError":
            prefix = f"{where}: " if where else ""
            return (f"{prefix}cannot read the run store ({seen}); it is damaged or not a "
                    "run store")
        seen = seen.__cause__ or seen.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_library_logs(args.traceback)
    try:
        return int(args.handler(args) or ExitStatus.OK)
    except HarnessUsageError as exc:
        if args.traceback:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except HarnessError as exc:
        if args.traceback:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    except Exception as exc:
        reason = _store_damage(exc, getattr(args, "run", None) or getattr(args, "resume", None))
        if reason is None:
            raise  # a bug: its traceback is what the next engineer needs
        if args.traceback:
            traceback.print_exc()
        print(f"error: {reason}", file=sys.stderr)
        return ExitStatus.ERROR


if __name__ == "__main__":
    sys.exit(main())
