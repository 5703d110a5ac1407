"""`harness plan show PLAN`: the jobs a plan expands to, without running anything."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.plan import load_plan


def _show(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    if args.format == "json":
        print(
            json.dumps(
                {
                    "idle_baseline_s": plan.idle_baseline_s,
                    "cooldown_s": plan.cooldown_s,
                    "max_attempts": plan.max_attempts,
                    "datasets": {
                        d.name: str(d.source) if d.source else None for d in plan.datasets
                    },
                    "jobs": [
                        {"job_id": j.job_id, "pinned": list(j.pinned), "spec": j.spec}
                        for j in plan.jobs
                    ],
                }
            )
        )
        return 0
    table = Table(
        title=f"{args.plan}: {len(plan.jobs)} jobs (idle baseline "
        f"{plan.idle_baseline_s:g} s per device, cool-down {plan.cooldown_s:g} s)"
    )
    for column in (
        "job id",
        "method",
        "model",
        "data set",
        "batch",
        "epochs",
        "max steps",
        "seed",
        "repeat",
        "devices",
    ):
        table.add_column(column)
    for job in plan.jobs:
        table.add_row(
            job.job_id,
            job.method,
            job.model,
            job.dataset,
            str(job.batch_size),
            str(job.epochs),
            str(job.max_steps or "-"),
            str(job.seed),
            str(job.repeat),
            ", ".join(job.pinned) or "any",
        )
    Console(width=160).print(table)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser("plan", help="inspect plans")
    commands = plan.add_subparsers(dest="plan_command", required=True, metavar="COMMAND")
    show = commands.add_parser("show", help="print the jobs a plan expands to")
    show.add_argument("plan", type=Path)
    show.add_argument("--format", choices=("text", "json"), default="text")
    show.set_defaults(handler=_show)
