"""`harness run`: run a plan on an inventory into a new run store, or finish one (`--resume`).

With no arguments it runs the embedded default: `inventory/local.yaml` (this
machine) and `inventory/plan-default.yaml` (standard vs lowmem, MLP on the
digits, after an idle baseline), shows progress per device and ends with a
comparison table per method and the run directory's path. This module reads the
command line; `harness.service.RunService` does the run.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import time
from importlib import resources
from pathlib import Path

from rich.console import Console

from harness.errors import HarnessUsageError
from harness.service import LATEST, RunRequest, RunService

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def packaged_file(name: str) -> Path:
    """A file shipped in the `inventory` package (works from an installed package too)."""
    resource = resources.files("inventory") / name
    return Path(str(resource))


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def run_request(args: argparse.Namespace) -> RunRequest:
    """The command line as a request; bad options are refused before anything is made."""
    devices = Path(args.devices) if args.devices else None
    if args.resume:
        if args.plan:
            raise HarnessUsageError(
                "--plan: a resumed run keeps its own plan (run_dir/plan.yaml)"
            )
        return RunRequest(Path(args.resume), resume=True, inventory_path=devices,
                          dashboard_port=args.dashboard, argv=tuple(sys.argv))
    run_id = args.run_id or new_run_id()
    if not RUN_ID_PATTERN.match(run_id):
        raise HarnessUsageError(
            f"--run-id: expected letters, digits, '.', '_', '-', got {run_id!r}"
        )
    if run_id == LATEST:
        raise HarnessUsageError(f"--run-id: {LATEST!r} names the link to the newest run")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HarnessUsageError(f"--out: {out} is a file, not a directory of runs")
    return RunRequest(
        out / run_id,
        plan_path=Path(args.plan) if args.plan else packaged_file("plan-default.yaml"),
        inventory_path=devices or packaged_file("local.yaml"),
        dashboard_port=args.dashboard,
        argv=tuple(sys.argv),
    )


def _run(args: argparse.Namespace) -> int:
    return RunService(run_request(args), say=Console(stderr=True).print).run()


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run a plan on devices (default: this machine)")
    run.add_argument("--devices", help="inventory file (default: the embedded local.yaml)")
    run.add_argument("--plan", help="plan file (default: the embedded plan-default.yaml)")
    run.add_argument("--out", default="runs", help="directory of run directories (./runs)")
    run.add_argument("--run-id", help="name of the run directory (default: time + random)")
    run.add_argument(
        "--resume", metavar="RUN_DIR", help="finish the jobs of this run that did not complete"
    )
    run.add_argument(
        "--dashboard", nargs="?", type=int, const=8050, metavar="PORT",
        help="serve the live dashboard on 127.0.0.1:PORT (default 8050) during the run",
    )
    run.set_defaults(handler=_run)
