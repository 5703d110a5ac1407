"""`harness`: the host command line (run, plan, data, devices, meter, dashboard, report, ...).

Each command group lives in `harness/commands/<name>.py` and exposes
`register(subparsers)`, which adds its parser(s) and sets `handler=run` where
`run(args) -> int` returns an exit code from `harness.exit_codes`.
Bad input raises `HarnessUsageError` (one line, exit 2). The host never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
