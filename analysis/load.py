"""Load a run directory (`run.sqlite` + `manifest.json`) into tidy pandas frames.

The one place in `analysis` that reads the store, through `runstore.reader.StoreReader`
(read-only, so a notebook can load a run while the harness is still writing it; a store
of a newer schema version is refused, an older one loaded as it is). Every
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

import numpy as np
import pandas as pd

from runstore.reader import StoreProblem, StoreReader, find_run_dir
from runstore.schema import MANIFEST_NAME

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
                       "vm_bytes", "peak_tensor_bytes", "step"),
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


def _read_table(
    store: StoreReader, table: str, present: set[str], missing: list[str]
) -> pd.DataFrame:
    wanted = TABLE_COLUMNS[table]
    if table not in present:
        missing.append(f"table {table} is missing from the store")
        return pd.DataFrame(columns=list(wanted))
    have = set(store.columns(table))
    lacking = [c for c in wanted if c not in have]
    if lacking:
        missing.append(f"table {table} lacks column(s) {', '.join(lacking)}")
    cols = [c for c in wanted if c in have]
    frame = pd.read_sql_query(store.select_sql(table, cols), store.conn)
    for col in lacking:
        frame[col] = None
    return frame[list(wanted)]


def load_run(path: str | Path, power: bool = True) -> Run:
    """Load `path` (a run directory or its `run.sqlite`); `power=False` skips the samples."""
    try:
        run_dir = find_run_dir(path)
        store = StoreReader(run_dir, accept_older=True)
    except StoreProblem as exc:
        raise RunLoadError(str(exc)) from exc
    missing: list[str] = []
    try:
        manifest = store.manifest()
    except StoreProblem as exc:
        manifest = None
        missing.append(f"{MANIFEST_NAME} is unreadable ({exc})")
    else:
        if manifest is None:
            missing.append(f"{MANIFEST_NAME} is missing")
    try:
        present = store.tables()
        frames = {t: _read_table(store, t, present, missing) for t in TABLE_COLUMNS}
        if not power:
            traces, counters = [], None
        elif "power_samples" in present:
            traces = [PowerTrace(*trace) for trace in store.power_traces()]
            counters_sql = store.counters_sql()
            counters = pd.read_sql_query(counters_sql, store.conn) if counters_sql else None
        else:
            missing.append("table power_samples is missing from the store")
            traces, counters = [], None
    except sqlite3.DatabaseError as exc:
        raise RunLoadError(f"{store.db_path}: cannot read the run store: {exc}") from exc
    finally:
        store.close()
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
