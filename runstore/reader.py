"""`StoreReader`: the read-only view of one run store that every reader goes through.

It opens `run.sqlite` read-only (WAL: it never blocks or disturbs the writer, so a
run can be read while it is written), checks the schema version, knows the table
names and holds the queries readers share: the dashboard's incremental reads, the
end-of-run comparison, the analysis tables, the export. A store that cannot be read
(no directory, no store yet, empty, not SQLite, another schema version) is a
`StoreProblem` whose message says what to do, never a stack trace.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runstore.schema import DB_NAME, MANIFEST_NAME, TABLES, latest_version, stored_version

BUSY_TIMEOUT_S = 10.0


class StoreProblem(ValueError):
    """Why a run store cannot be read (missing, empty, unreadable, other schema version)."""


def run_dir_of(path: str | Path) -> Path:
    """The run directory of `path` (a run directory or its `run.sqlite`)."""
    path = Path(path)
    return path.parent if path.name == DB_NAME else path


def find_run_dir(value: str | Path) -> Path:
    """The run directory a command line names (the directory or its `run.sqlite`), checked."""
    run_dir = run_dir_of(value)
    if not (run_dir / DB_NAME).is_file():
        raise StoreProblem(f"{value}: no {DB_NAME} (not a run directory)")
    return run_dir


class StoreReader:
    """A read-only connection to one run store. A context manager; `close()` is idempotent.

    `accept_older`: read a store of an older schema version as it is (the analysis, which
    reports what is missing) instead of refusing it (the dashboard, which needs every
    column). A newer store is always refused.
    """

    def __init__(self, path: str | Path, *, accept_older: bool = False) -> None:
        self.run_dir = run_dir_of(path)
        self.db_path = self.run_dir / DB_NAME
        self.conn = _open(self.run_dir, self.db_path)
        self._lock = threading.Lock()
        try:
            self.version = stored_version(self.conn)
            self._check_version(accept_older)
        except BaseException:
            self.conn.close()
            raise

    def _check_version(self, accept_older: bool) -> None:
        latest = latest_version()
        if self.version == latest or (accept_older and self.version < latest):
            return
        age = "older" if self.version < latest else "newer"
        hint = (
            "open it once with this harness (e.g. `harness run --resume`) to back it up and migrate"
            if self.version < latest
            else "use the harness version that wrote it"
        )
        raise StoreProblem(
            f"{self.db_path}: schema version {self.version} is {age} than the version this "
            f"harness reads ({latest}); {hint}"
        )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ generic reads

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of one SELECT (thread-safe; what the writer has committed so far)."""
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def tables(self) -> set[str]:
        rows = self.query("SELECT name FROM sqlite_master WHERE type='table'")
        return {row[0] for row in rows}

    def columns(self, table: str) -> list[str]:
        _check_table(table)
        return [row[1] for row in self.query(f"PRAGMA table_info({table})")]

    def select_sql(self, table: str, columns: Sequence[str] | None = None) -> str:
        """The SELECT of `columns` (default: all) of a store table, for pandas' readers."""
        _check_table(table)
        return f"SELECT {', '.join(columns) if columns else '*'} FROM {table}"

    def manifest(self) -> dict[str, Any] | None:
        """`manifest.json` beside the store (None if absent); `StoreProblem` if unreadable."""
        path = self.run_dir / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreProblem(f"{path}: cannot read the manifest: {exc}") from exc

    # ------------------------------------------------------------ jobs and results

    def job_states(self) -> dict[str, sqlite3.Row]:
        """job_id -> (job_id, status, attempts) of every planned job (resume, exit status)."""
        return {r["job_id"]: r for r in self.query("SELECT job_id, status, attempts FROM jobs")}

    def running_job_ids(self) -> list[str]:
        return [r["job_id"] for r in self.query("SELECT job_id FROM jobs WHERE status = 'running'")]

    # ------------------------------------------------------------ the dashboard's reads

    def rows_after(self, stream: str, after_id: int, limit: int,
                   kinds: Sequence[str] = ()) -> list[sqlite3.Row]:
        """The rows of a streamed table with id > `after_id`, oldest first (`STREAMS`)."""
        sql = STREAMS[stream]
        params: tuple = (after_id, limit)
        if stream == "events":
            marks = ", ".join("?" * len(kinds))
            sql = sql.replace("{kinds}", marks)
            params = (after_id, *kinds, limit)
        return self.query(sql, params)

    def power_after(self, after_id: int, limit: int) -> list[tuple]:
        """New power samples as plain tuples (id, device, meter, t_host_s, power_w, volts,
        amps): the bulk of a store, read without row objects."""
        with self._lock:
            cursor = self.conn.cursor()
            cursor.row_factory = None
            return cursor.execute(
                "SELECT id, device, meter, t_host_s, power_w, volts, amps FROM power_samples "
                "WHERE id > ? AND power_w IS NOT NULL ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()

    def recorded_meters(self) -> dict[str, Any]:
        """run_info's `meters`: per device, the meters the run recorded (with accuracy)."""
        rows = self.query("SELECT value FROM run_info WHERE key = 'meters'")
        return json.loads(rows[0]["value"]) if rows else {}

    def device_meters(self) -> list[tuple[str, str | None]]:
        """(device, meter_json) of every device."""
        return [(r["name"], r["meter_json"]) for r in
                self.query("SELECT name, meter_json FROM devices")]

    def clock_offsets(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.query(
            "SELECT job_id, attempt, phase, t_host_s, offset_s, error_s FROM clock_offsets")]

    def devices(self) -> list[sqlite3.Row]:
        return self.query(
            "SELECT name, transport, status, reason, meter_json, updated_host_s FROM devices "
            "ORDER BY name"
        )

    def meter_stats(self) -> list[sqlite3.Row]:
        return self.query(
            "SELECT device, meter, samples, achieved_hz, rejected_records, gaps, "
            "updated_host_s FROM meter_stats ORDER BY device, meter"
        )

    def jobs_by_start(self) -> list[sqlite3.Row]:
        """Jobs, started ones first in start order, then the rest in plan order."""
        return self.query(
            "SELECT job_id, plan_index, kind, method, model, dataset, epochs, status, device, "
            "attempts, reason, t_start_host_s, t_end_host_s FROM jobs "
            "ORDER BY t_start_host_s IS NULL, t_start_host_s, plan_index"
        )

    def result_summaries(self) -> dict[str, dict[str, Any]]:
        rows = self.query(
            "SELECT job_id, test_accuracy, train_accuracy, epochs, steps FROM results"
        )
        return {r["job_id"]: dict(r) for r in rows}

    def unfinished_jobs(self) -> tuple[int, int]:
        """(jobs pending or running, all jobs)."""
        pending = self.query(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'running')"
        )[0][0]
        return pending, self.query("SELECT COUNT(*) FROM jobs")[0][0]

    def overview(self) -> dict[str, Any]:
        """Devices, jobs by status, first start and last end: one line of a run list."""
        statuses = {r[0]: r[1] for r in self.query(
            "SELECT status, COUNT(*) FROM jobs GROUP BY status")}
        return {
            "devices": self.query("SELECT COUNT(*) FROM devices")[0][0],
            "jobs": statuses,
            "t_start_s": self.query("SELECT MIN(t_start_host_s) FROM jobs")[0][0],
            "t_end_s": self.query("SELECT MAX(t_end_host_s) FROM jobs")[0][0],
        }

    # ------------------------------------------------------------ the analysis' bulk reads

    def counters_sql(self) -> str | None:
        """The SELECT of the meters' own energy counters (`counter_wh`, schema 2) in time
        order, for pandas; None when the store has none."""
        if "power_samples" not in self.tables():
            return None
        if "counter_wh" not in self.columns("power_samples"):
            return None
        return ("SELECT device, meter, t_host_s, counter_wh FROM power_samples "
                "WHERE counter_wh IS NOT NULL ORDER BY device, meter, t_host_s")

    def power_traces(self) -> list[tuple[str, str, Any, Any]]:
        """Every (device, meter) trace as (device, meter, t_host_s, power_w) numpy arrays in
        time order, through ADBC: columnar Arrow batches straight into numpy with no Python
        object per sample, so millions of samples load quickly. A store with one trace is
        read by a plain table scan (no index lookups) and sorted here."""
        import adbc_driver_sqlite.dbapi as adbc_sqlite
        import numpy as np

        traces = []
        uri = f"{self.db_path.resolve().as_uri()}?mode=ro"
        with adbc_sqlite.connect(uri) as conn, conn.cursor() as cur:
            pairs = _power_pairs(cur)
            for device, meter in pairs:
                if len(pairs) == 1:
                    cur.execute("SELECT t_host_s, power_w FROM power_samples "
                                "WHERE power_w IS NOT NULL AND t_host_s IS NOT NULL")
                else:
                    cur.execute(
                        "SELECT t_host_s, power_w FROM power_samples WHERE device = ? AND "
                        "meter = ? AND power_w IS NOT NULL AND t_host_s IS NOT NULL "
                        "ORDER BY t_host_s",
                        (device, meter),
                    )
                table = cur.fetch_arrow_table()
                t = table.column(0).to_numpy().astype(float, copy=False)
                p = table.column(1).to_numpy().astype(float, copy=False)
                if t.size > 1 and np.any(t[1:] < t[:-1]):
                    order = np.argsort(t, kind="stable")
                    t, p = t[order], p[order]
                traces.append((device, meter, t, p))
        return traces


# Streamed tables the dashboard follows by id (`StoreReader.rows_after`).
STREAMS = {
    "memory": "SELECT id, device, job_id, t_host_s, rss_bytes, hwm_bytes, peak_tensor_bytes "
              "FROM memory_samples WHERE id > ? AND t_host_s IS NOT NULL ORDER BY id LIMIT ?",
    "phases": "SELECT id, device, job_id, attempt, kind, idx, t_start_host_s, t_end_host_s "
              "FROM phases WHERE id > ? ORDER BY id LIMIT ?",
    "gaps": "SELECT id, device, meter, t_start_s, t_end_s, reason FROM meter_gaps "
            "WHERE id > ? ORDER BY id LIMIT ?",
    "events": "SELECT id, device, job_id, kind, t_host_s, raw_json FROM events WHERE id > ? "
              "AND kind IN ({kinds}) ORDER BY id LIMIT ?",
}


def _check_table(table: str) -> None:
    if table not in TABLES:
        raise ValueError(f"unknown run store table {table!r}; choose one of {', '.join(TABLES)}")


def _open(run_dir: Path, path: Path) -> sqlite3.Connection:
    if not run_dir.is_dir():
        raise StoreProblem(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise StoreProblem(f"{path}: no run store yet (missing {DB_NAME}; has the run started?)")
    if path.stat().st_size == 0:
        raise StoreProblem(f"{path}: the run store is empty (no schema written yet)")
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
            check_same_thread=False,
        )
        conn.row_factory = sqlite3.Row
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise StoreProblem(f"{path}: not a readable run store ({exc})") from exc
    if not tables:
        conn.close()
        raise StoreProblem(f"{path}: the run store is empty (no tables yet)")
    return conn


def _power_pairs(cur: Any) -> list[tuple[str, str]]:
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
