"""`python -m trainers SUBCOMMAND ...`: the engine's own command line.

Each subcommand lives in `trainers/commands/<name>.py` and exposes
`register(subparsers)`, which adds its parser and sets `handler=run` where
`run(args) -> int` returns the exit code. Bad input raises `UsageError`
(one line on stderr, exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from contract.errors import UsageError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Subcommand modules under trainers.commands, in the order --help lists them.
COMMAND_MODULES = ("train", "memory", "measure", "bop_encodings", "continual", "kernels")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__.splitlines()[0])
    parser.add_argument("--traceback", action="store_true", help="show the stack on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"trainers.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"trainers.commands.{name}":
                continue  # subcommand not built yet
            raise
        module.register(subparsers)
    return parser




def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        if args.traceback:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
