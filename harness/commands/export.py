"""`harness export RUN --format parquet|csv [--out DIR]`: every table of a run as tidy files.

One file per table (`jobs`, `events`, `power_samples`, `memory_samples`, ...),
one row per observation, columns named with their units as in the store. The
store is opened read-only, so exporting a run that is still being written is safe.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import HarnessUsageError
from harness.store import connect_read_only

TABLES = (
    "run_info",
    "devices",
    "jobs",
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
        for table in TABLES:
            frame = pd.read_sql_query(f"SELECT * FROM {table}", conn)  # names from TABLES only
            path = out_dir / f"{table}.{fmt}"
            if fmt == "parquet":
                frame.to_parquet(path, index=False)
            else:
                frame.to_csv(path, index=False)
            written.append(path)
    finally:
        conn.close()
    return written


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
