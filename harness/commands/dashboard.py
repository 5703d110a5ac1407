"""`harness dashboard [RUN_DIR|RUNS_DIR]`: serve the live dashboard of a run (or a list of runs).

Bound to 127.0.0.1 by default. `--host` other than loopback exposes the runs to the
network, so it needs `--token` (or HARNESS_DASHBOARD_TOKEN); the token is then checked
on every request, the event stream included.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from harness.exit_codes import ExitStatus

TOKEN_ENV = "HARNESS_DASHBOARD_TOKEN"


def _run(args: argparse.Namespace) -> int:
    from harness.dashboard import start_dashboard  # numpy and the server: only when used

    token = args.token or os.environ.get(TOKEN_ENV) or None
    server = start_dashboard(Path(args.path), args.host, args.port, token)
    print(f"dashboard of {args.path}: {server.url}", flush=True)
    print("press Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return ExitStatus.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dashboard", help="serve a live web page of a run's power and memory traces"
    )
    parser.add_argument(
        "path",
        nargs="?",
        default="runs",
        metavar="RUN_DIR|RUNS_DIR",
        help="a run directory, or a directory of runs to pick from (default: ./runs)",
    )
    parser.add_argument("--port", type=int, default=8050, help="port (default 8050; 0: any free)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1); any other needs --token",
    )
    parser.add_argument("--token", help=f"token required on every request (or set {TOKEN_ENV})")
    parser.set_defaults(handler=_run)
