"""`harness export RUN --format parquet|csv [--out DIR]`: every table of a run as tidy files.

One file per store table (`events`, `power_samples`, `memory_samples`, ...), one row per
observation, columns named with their units as in the store; `jobs` and `devices` add
the columns scripts want (`job`, `implementation`, `throttled`; `device`, `machine`);
and `energy`: one row per window and meter, the figures of `analysis.run_energy` (the
same the report, compare and the dashboard show), with their intervals and status.
The energy table carries every joule column in kWh too (`energy_kwh` beside `energy_j`).
`emissions.csv` (always CSV) is CodeCarbon's format, one row per job and meter
(`analysis.emissions`: `--carbon-intensity` gCO2e/kWh, default 475, the IEA's 2019 world
average; `--country` ISO code for the record).
The store is read through `runstore.reader.StoreReader` (read-only), so exporting a run
that is still being written is safe.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import HarnessUsageError
from runstore.reader import StoreProblem, StoreReader, find_run_dir
from runstore.schema import TABLES

# `jobs` and `devices` are written by `tidy_tables`, with the columns scripts want.
STORE_TABLES = tuple(table for table in TABLES if table not in ("jobs", "devices"))


def export_run(run_dir: Path, fmt: str, out_dir: Path | None = None,
               carbon_intensity_g_per_kwh: float | None = None,
               country_iso_code: str | None = None) -> list[Path]:
    import pandas as pd

    from analysis.emissions import DEFAULT_INTENSITY_G_PER_KWH

    if fmt not in ("parquet", "csv"):
        raise HarnessUsageError(f"--format: unknown {fmt!r}; choose one of: csv, parquet")
    try:
        run_dir = find_run_dir(run_dir)
        reader = StoreReader(run_dir, accept_older=True)
    except StoreProblem as exc:
        raise HarnessUsageError(str(exc)) from exc
    out_dir = out_dir or (run_dir / "export")
    if out_dir.exists() and not out_dir.is_dir():
        raise HarnessUsageError(f"--out: {out_dir} is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        frames = {table: pd.read_sql_query(reader.select_sql(table), reader.conn)
                  for table in STORE_TABLES}
    finally:
        reader.close()
    intensity = (DEFAULT_INTENSITY_G_PER_KWH if carbon_intensity_g_per_kwh is None
                 else carbon_intensity_g_per_kwh)
    if not (intensity >= 0 and intensity < 1e5):
        raise HarnessUsageError(
            f"--carbon-intensity: expected gCO2e/kWh between 0 and 100000, got {intensity}"
        )
    tidy = tidy_tables(run_dir)
    emissions = emissions_table(run_dir, tidy, intensity, country_iso_code)
    frames.update(tidy)
    path = out_dir / "emissions.csv"
    emissions.to_csv(path, index=False)
    written.append(path)
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
    from analysis.emissions import with_kwh
    from analysis.load import load_run
    from analysis.run_energy import energy_table

    run = load_run(run_dir)
    return {"energy": with_kwh(energy_table(run)), "jobs": job_conditions(run),
            "devices": device_table(run)}


def emissions_table(run_dir: Path, tidy: dict, intensity_g_per_kwh: float,
                    country_iso_code: str | None):
    """CodeCarbon's emissions.csv rows from the tidy tables."""
    from analysis import emissions
    from analysis.load import load_run

    return emissions.emissions_table(load_run(run_dir, power=False), tidy["energy"],
                                     tidy["devices"], intensity_g_per_kwh, country_iso_code)


def _export(args: argparse.Namespace) -> int:
    for path in export_run(Path(args.run), args.format, args.out, args.carbon_intensity,
                           args.country):
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="write a run's tables as parquet or csv")
    export.add_argument("run", help="the run directory (runs/<run-id>)")
    export.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    export.add_argument(
        "--out", type=Path, default=None, help="output directory (default: RUN/export)"
    )
    export.add_argument(
        "--carbon-intensity", type=float, default=None, metavar="G_PER_KWH",
        help="carbon intensity of the electricity for emissions.csv, gCO2e/kWh (default 475: "
             "the IEA's 2019 world average; give your grid's)",
    )
    export.add_argument("--country", metavar="ISO",
                        help="ISO 3166 alpha-3 code recorded in emissions.csv (e.g. DEU)")
    export.set_defaults(handler=_export)
