"""`harness report RUN [--out DIR]` and `harness compare RUN_A RUN_B`.

The report writes `report.html` (self-contained, figures embedded) and the tables as
CSV into DIR (default RUN/report) and prints the headline table; compare prints run
B against run A per method, model, data and batch. `analysis` (pandas, matplotlib)
is imported only when a command runs, so building the CLI stays light.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from harness.errors import HarnessUsageError
from runstore.reader import StoreProblem, find_run_dir

TERMINAL_COLUMNS = ("device", "meter", "meter_kind", "method", "n", "energy withheld",
                    "s / epoch", "J / epoch", "J / epoch above idle",
                    "test accuracy", "accuracy diff", "RSS+ reduction", "energy ratio")


def _run_dir(value: str) -> Path:
    try:
        return find_run_dir(value)
    except StoreProblem as exc:
        raise HarnessUsageError(str(exc)) from exc


def _out_dir(value: str | None) -> Path | None:
    """--out: a directory (made if missing), never an existing file."""
    if value is None:
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise HarnessUsageError(f"--out: {value} is a file, not a directory")
    return path


def _print_table(rows: list[dict], columns: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(col)) for col in columns))
    Console(width=200).print(table)


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _report(args: argparse.Namespace) -> int:
    from analysis.report import analyse, write_report

    run_dir = _run_dir(args.run)
    out_dir = _out_dir(args.out)
    extra = [m for m in (args.paper_models or "").split(",") if m]
    analysis = analyse(run_dir, modeled=not args.no_model, extra_models=extra)
    path = write_report(analysis, out_dir or run_dir / "report")
    rows = analysis.headline.to_dict("records")
    if args.format == "json":
        print(json.dumps({"report": str(path), "headline": rows, "missing": analysis.missing,
                          "low_confidence": analysis.low_confidence},
                         default=str))
        return 0
    columns = [c for c in TERMINAL_COLUMNS if c in analysis.headline]
    _print_table(rows, columns, f"run {analysis.run.run_id}: per method (mean [95 % t-interval])")
    for note in analysis.missing:
        print(f"missing: {note}")
    for note in analysis.low_confidence:
        print(f"low-confidence: {note}")
    print(f"report: {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from analysis.compare import compare_runs, run_differences, shared_devices_and_meters
    from analysis.jobs import job_table
    from analysis.load import load_run
    from analysis.run_energy import energy_table

    tables = []
    for value in (args.run_a, args.run_b):
        run = load_run(_run_dir(value))
        tables.append((run, job_table(run, energy_table(run))))
    (run_a, jobs_a), (run_b, jobs_b) = tables
    differences = run_differences(run_a, run_b, jobs_a, jobs_b)
    if not shared_devices_and_meters(jobs_a, jobs_b) and not args.across_devices:
        raise HarnessUsageError(
            f"{args.run_a} and {args.run_b} share no device and meter: a ratio across devices "
            "or meters measures them, not the runs; pass --across-devices to compute it "
            "anyway (every row is labelled so)"
            + (f" [differences: {'; '.join(differences)}]" if differences else "")
        )
    frame = compare_runs(jobs_a, jobs_b, across=args.across_devices)
    if args.out:
        if Path(args.out).is_dir():
            raise HarnessUsageError(f"--out: {args.out} is a directory; give the CSV file's name")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
    rows = frame.to_dict("records")
    if args.format == "json":
        print(json.dumps({"a": run_a.run_id, "b": run_b.run_id, "differences": differences,
                          "across_devices": args.across_devices, "rows": rows}, default=str))
        return 0
    for note in differences:
        print(f"differs: {note}")
    if not differences:
        print("differs: nothing recorded (same plan, devices, meters, epochs and software)")
    columns = [c for c in ("method", "model", "dataset", "batch_size", "device", "meter",
                           "metric", "n_a", "ci_a", "n_b", "ci_b", "versus", "value", "note")
               if c in frame]
    title = f"A = {run_a.run_id}, B = {run_b.run_id}"
    if args.across_devices:
        title += " (ACROSS devices and meters: ratios mix what measured them)"
    _print_table(rows, columns, title)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser("report", help="HTML report + CSV tables of a run")
    report.add_argument("run", help="run directory (runs/<id>)")
    report.add_argument("--out", help="output directory (default: RUN/report)")
    report.add_argument("--no-model", action="store_true",
                        help="skip the engine's modeled memory (no `trainers memory` calls)")
    report.add_argument("--paper-models", metavar="M1,M2",
                        help="also model these in the reproduction table (e.g. mlp,cnv,binarynet)")
    report.add_argument("--format", choices=("table", "json"), default="table")
    report.set_defaults(handler=_report)
    compare = subparsers.add_parser("compare", help="compare two runs (devices, versions)")
    compare.add_argument("run_a", help="run directory A (the reference)")
    compare.add_argument("run_b", help="run directory B")
    compare.add_argument(
        "--across-devices", action="store_true",
        help="pool devices and meters (ratios across them are refused otherwise; labelled)",
    )
    compare.add_argument("--out", help="write the comparison as CSV here")
    compare.add_argument("--format", choices=("table", "json"), default="table")
    compare.set_defaults(handler=_compare)
