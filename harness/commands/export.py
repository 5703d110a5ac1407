"""`harness export RUN --format parquet|csv [--out DIR]`: every table of a run as tidy files.

One file per store table (`events`, `power_samples`, `memory_samples`, ...), one row per
observation, columns named with their units as in the store; `jobs` and `devices` add
the columns scripts want (`job`, `implementation`, `throttled`; `device`, `machine`);
and `energy`: one row per window and meter, the figures of `analysis.run_energy` (the
same the report, compare and the dashboard show), with their intervals and status.
The store is opened read-only, so exporting a run that is still being written is safe.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import HarnessUsageError
from harness.store import connect_read_only

TABLES = (
    "run_info",
    "events",
    "memory_samples",
    "power_samples",
    "meter_gaps",
    "meter_stats",
    "clock_offsets",
    "phases",
    "results",
)


def export_run(run_dir: Path, fmt: str, out_dir: Path | None = None) -> list[Path]:
    import pandas as pd

    if fmt not in ("parquet", "csv"):
        raise HarnessUsageError(f"--format: unknown {fmt!r}; choose one of: csv, parquet")
    conn = connect_read_only(run_dir)
    out_dir = out_dir or (run_dir / "export")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        frames = {table: pd.read_sql_query(f"SELECT * FROM {table}", conn)  # names: TABLES only
                  for table in TABLES}
    finally:
        conn.close()
    frames.update(tidy_tables(run_dir))
    for table, frame in frames.items():
        path = out_dir / f"{table}.{fmt}"
        if fmt == "parquet":
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)
        written.append(path)
    return written


def tidy_tables(run_dir: Path) -> dict:
    """`energy`, `jobs` and `devices` as analysis reads them (see docs/run-store.md)."""
    from analysis.conditions import device_table, job_conditions
    from analysis.load import load_run
    from analysis.run_energy import energy_table

    run = load_run(run_dir)
    return {"energy": energy_table(run), "jobs": job_conditions(run),
            "devices": device_table(run)}


def _export(args: argparse.Namespace) -> int:
    for path in export_run(Path(args.run), args.format, args.out):
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="write a run's tables as parquet or csv")
    export.add_argument("run", help="the run directory (runs/<run-id>)")
    export.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    export.add_argument(
        "--out", type=Path, default=None, help="output directory (default: RUN/export)"
    )
    export.set_defaults(handler=_export)
