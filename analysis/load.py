"""Load a run directory (`run.sqlite` + `manifest.json`) into tidy pandas frames.

The one place in `analysis` that reads the store: a read-only SQLite connection,
so a notebook can load a run while the harness is still writing it. Every
timestamp column is host wall-clock seconds (`t_*_host_s`, `t_host_s`). What a
store lacks (a table, a manifest) does not stop the load: the frame is empty
with its usual columns and `Run.missing` names what was not there.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import adbc_driver_sqlite.dbapi as adbc_sqlite
import numpy as np
import pandas as pd

DB_NAME = "run.sqlite"
MANIFEST_NAME = "manifest.json"

# Table -> the columns analysis reads (a store may hold more).
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "run_info": ("key", "value"),
    "devices": ("name", "transport", "host", "tags_json", "meter_json", "facts_json", "status",
                "reason", "updated_host_s"),
    "jobs": ("job_id", "plan_index", "kind", "method", "model", "dataset", "batch_size", "epochs",
             "max_steps", "seed", "repeat", "pinned_json", "spec_json", "status", "device",
             "attempts", "exit_code", "reason", "t_start_host_s", "t_end_host_s"),
    "events": ("device", "job_id", "attempt", "line_no", "seq", "kind", "t_host_s",
               "malformed_reason", "raw_json"),
    "memory_samples": ("device", "job_id", "attempt", "seq", "t_host_s", "rss_bytes", "hwm_bytes",
                       "vm_bytes", "tensor_peak_bytes", "step"),
    "meter_gaps": ("device", "meter", "t_start_s", "t_end_s", "reason"),
    "meter_stats": ("device", "meter", "samples", "achieved_hz", "rejected_records", "gaps"),
    "clock_offsets": ("device", "job_id", "attempt", "phase", "t_host_s", "offset_s", "rtt_s",
                      "error_s", "samples"),
    "phases": ("device", "job_id", "attempt", "kind", "idx", "t_start_host_s", "t_end_host_s"),
    "results": ("job_id", "device", "attempt", "status", "method", "test_accuracy",
                "train_accuracy", "test_loss", "epochs", "steps", "mean_epoch_s", "seconds_total",
                "peak_tensor_bytes", "peak_hwm_bytes", "peak_rss_delta_bytes", "metrics_json"),
}
POWER_COLUMNS = ("device", "meter", "t_host_s", "power_w")


class RunLoadError(ValueError):
    """The path is not a run directory (or its store cannot be read at all)."""


@dataclass
class PowerTrace:
    """One meter's samples on one device, sorted by host time (numpy, for integration)."""

    device: str
    meter: str
    t_host_s: np.ndarray
    power_w: np.ndarray


@dataclass
class Run:
    """A loaded run: tidy frames plus what was missing from the store."""

    path: Path
    run_id: str
    info: dict[str, Any]
    manifest: dict[str, Any] | None
    devices: pd.DataFrame
    jobs: pd.DataFrame
    events: pd.DataFrame
    memory: pd.DataFrame
    results: pd.DataFrame
    offsets: pd.DataFrame
    phases: pd.DataFrame
    gaps: pd.DataFrame
    meter_stats: pd.DataFrame
    traces: list[PowerTrace]
    counters: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["device", "meter", "t_host_s", "counter_wh"]))  # meters' own energy counters
    missing: list[str] = field(default_factory=list)

    @property
    def power(self) -> pd.DataFrame:
        """All power samples as one tidy frame (device, meter, t_host_s, power_w)."""
        if not self.traces:
            return pd.DataFrame({c: pd.Series(dtype=float if c in ("t_host_s", "power_w")
                                              else object) for c in POWER_COLUMNS})
        return pd.concat(
            [
                pd.DataFrame({"device": tr.device, "meter": tr.meter, "t_host_s": tr.t_host_s,
                              "power_w": tr.power_w})
                for tr in self.traces
            ],
            ignore_index=True,
        )

    def trace(self, device: str, meter: str | None = None) -> PowerTrace | None:
        """The device's trace (its first meter unless `meter` is given), None without one."""
        for tr in self.traces:
            if tr.device == device and (meter is None or tr.meter == meter):
                return tr
        return None


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)


def _tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    return {row[0] for row in rows}


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()}


def _read_table(
    conn: sqlite3.Connection, table: str, present: set[str], missing: list[str]
) -> pd.DataFrame:
    wanted = TABLE_COLUMNS[table]
    if table not in present:
        missing.append(f"table {table} is missing from the store")
        return pd.DataFrame(columns=list(wanted))
    have = _columns(conn, table)
    lacking = [c for c in wanted if c not in have]
    if lacking:
        missing.append(f"table {table} lacks column(s) {', '.join(lacking)}")
    cols = [c for c in wanted if c in have]
    frame = pd.read_sql_query(f"SELECT {', '.join(cols)} FROM {table}", conn)
    for col in lacking:
        frame[col] = None
    return frame[list(wanted)]


def _power_pairs(cur) -> list[tuple[str, str]]:
    """The distinct (device, meter) pairs by seeking the (device, meter, t) index once per
    pair (a loose index scan), instead of reading every entry as DISTINCT would."""
    pairs: list[tuple[str, str]] = []
    while True:
        # (device, meter) > (?, ?) spelt out: SQLite seeks the index for this form only
        after = "WHERE device > ? OR (device = ? AND meter > ?) " if pairs else ""
        params = (pairs[-1][0], *pairs[-1]) if pairs else ()
        cur.execute(f"SELECT device, meter FROM power_samples {after}"
                    "ORDER BY device, meter LIMIT 1", params)
        row = cur.fetchone()
        if row is None:
            return pairs
        pairs.append((row[0], row[1]))


def _read_power(db: Path, present: set[str], missing: list[str]) -> list[PowerTrace]:
    """Per (device, meter), time-ordered, through ADBC: columnar Arrow batches straight into
    numpy with no Python object per sample, so that millions of samples load quickly. A
    store with one trace is read by a plain table scan (no index lookups) and sorted here."""
    if "power_samples" not in present:
        missing.append("table power_samples is missing from the store")
        return []
    traces = []
    with adbc_sqlite.connect(f"{db.resolve().as_uri()}?mode=ro") as conn, conn.cursor() as cur:
        pairs = _power_pairs(cur)
        for device, meter in pairs:
            if len(pairs) == 1:
                cur.execute("SELECT t_host_s, power_w FROM power_samples "
                            "WHERE power_w IS NOT NULL AND t_host_s IS NOT NULL")
            else:
                cur.execute(
                    "SELECT t_host_s, power_w FROM power_samples WHERE device = ? AND meter = ? "
                    "AND power_w IS NOT NULL AND t_host_s IS NOT NULL ORDER BY t_host_s",
                    (device, meter),
                )
            table = cur.fetch_arrow_table()
            t = table.column(0).to_numpy().astype(float, copy=False)
            p = table.column(1).to_numpy().astype(float, copy=False)
            if t.size > 1 and np.any(t[1:] < t[:-1]):
                order = np.argsort(t, kind="stable")
                t, p = t[order], p[order]
            traces.append(PowerTrace(device, meter, t, p))
    return traces


def _read_counters(conn: sqlite3.Connection, present: set[str]) -> pd.DataFrame | None:
    """The meters' own energy counters (`counter_wh`, schema 2), time-ordered; None when
    the store has none."""
    if "power_samples" not in present or "counter_wh" not in _columns(conn, "power_samples"):
        return None
    return pd.read_sql_query(
        "SELECT device, meter, t_host_s, counter_wh FROM power_samples "
        "WHERE counter_wh IS NOT NULL ORDER BY device, meter, t_host_s", conn)


def load_run(path: str | Path, power: bool = True) -> Run:
    """Load `path` (a run directory or its `run.sqlite`); `power=False` skips the samples."""
    path = Path(path)
    run_dir = path.parent if path.name == DB_NAME else path
    db = run_dir / DB_NAME
    if not db.is_file():
        raise RunLoadError(f"{run_dir}: no {DB_NAME} (not a run directory)")
    missing: list[str] = []
    manifest = None
    manifest_path = run_dir / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as exc:
            missing.append(f"{MANIFEST_NAME} is unreadable ({exc})")
    else:
        missing.append(f"{MANIFEST_NAME} is missing")
    try:
        conn = _connect(db)
        present = _tables(conn)
    except sqlite3.DatabaseError as exc:
        raise RunLoadError(f"{db}: cannot read the run store: {exc}") from exc
    try:
        frames = {t: _read_table(conn, t, present, missing) for t in TABLE_COLUMNS}
        traces = _read_power(db, present, missing) if power else []
        counters = _read_counters(conn, present) if power else None
    finally:
        conn.close()
    info = {}
    for key, value in zip(frames["run_info"]["key"], frames["run_info"]["value"]):
        try:
            info[key] = json.loads(value)
        except (TypeError, ValueError):
            info[key] = value
    run_id = str(info.get("run_id") or (manifest or {}).get("run_id") or run_dir.name)
    return Run(
        path=run_dir,
        run_id=run_id,
        info=info,
        manifest=manifest,
        devices=frames["devices"],
        jobs=frames["jobs"],
        events=frames["events"],
        memory=frames["memory_samples"],
        results=frames["results"],
        offsets=frames["clock_offsets"],
        phases=frames["phases"],
        gaps=frames["meter_gaps"],
        meter_stats=frames["meter_stats"],
        traces=traces,
        missing=missing,
        **({"counters": counters} if counters is not None else {}),
    )
