"""The run store's schema: versioned table definitions and the migration that applies them.

Each version lists the statements that bring a store from the previous version to
it; `migrate` (the writer, `harness.store.RunStore`, runs it when it opens a store)
backs a non-empty older store up (`run.sqlite.v<N>.bak`) before changing it and
refuses a store written by a newer harness. `docs/run-store.md` documents every
table and column; `runstore.reader` reads them.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

DB_NAME = "run.sqlite"
MANIFEST_NAME = "manifest.json"


class SchemaError(RuntimeError):
    """A store this code cannot bring to its schema (written by a newer harness)."""

# Version -> statements that bring a store from the previous version to this one.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE run_info (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
        """CREATE TABLE devices (
            name TEXT PRIMARY KEY, transport TEXT, host TEXT, tags_json TEXT,
            meter_json TEXT, facts_json TEXT, status TEXT NOT NULL DEFAULT 'planned',
            reason TEXT, updated_host_s REAL)""",
        """CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY, plan_index INTEGER, kind TEXT NOT NULL,
            method TEXT, model TEXT, dataset TEXT, batch_size INTEGER, epochs INTEGER,
            max_steps INTEGER, seed INTEGER, repeat INTEGER, pinned_json TEXT,
            spec_json TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
            device TEXT, attempts INTEGER NOT NULL DEFAULT 0, exit_code INTEGER, reason TEXT,
            t_start_host_s REAL, t_end_host_s REAL)""",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY, device TEXT NOT NULL, job_id TEXT NOT NULL,
            attempt INTEGER NOT NULL, line_no INTEGER NOT NULL, seq INTEGER, kind TEXT,
            t_mono_ns INTEGER, t_wall_s REAL, t_host_s REAL, t_received_host_s REAL,
            malformed_reason TEXT, raw_json TEXT NOT NULL,
            UNIQUE (device, job_id, attempt, line_no))""",
        "CREATE INDEX events_job ON events (job_id, attempt, kind)",
        """CREATE TABLE memory_samples (
            id INTEGER PRIMARY KEY, device TEXT NOT NULL, job_id TEXT NOT NULL,
            attempt INTEGER NOT NULL, seq INTEGER NOT NULL, t_host_s REAL, t_wall_s REAL,
            t_mono_ns INTEGER, rss_bytes INTEGER, hwm_bytes INTEGER, vm_bytes INTEGER,
            tensor_peak_bytes INTEGER, step INTEGER,
            UNIQUE (device, job_id, attempt, seq))""",
        """CREATE TABLE power_samples (
            id INTEGER PRIMARY KEY, device TEXT NOT NULL, meter TEXT NOT NULL,
            t_host_s REAL NOT NULL, power_w REAL, volts REAL, amps REAL, t_meter_s REAL)""",
        "CREATE INDEX power_samples_time ON power_samples (device, meter, t_host_s)",
        """CREATE TABLE meter_gaps (
            id INTEGER PRIMARY KEY, device TEXT NOT NULL, meter TEXT NOT NULL,
            t_start_s REAL NOT NULL, t_end_s REAL, reason TEXT)""",
        """CREATE TABLE meter_stats (
            device TEXT NOT NULL, meter TEXT NOT NULL, samples INTEGER, achieved_hz REAL,
            rejected_records INTEGER, gaps INTEGER, updated_host_s REAL,
            PRIMARY KEY (device, meter))""",
        """CREATE TABLE clock_offsets (
            id INTEGER PRIMARY KEY, device TEXT NOT NULL, job_id TEXT, attempt INTEGER,
            phase TEXT NOT NULL, t_host_s REAL NOT NULL, offset_s REAL NOT NULL,
            rtt_s REAL NOT NULL, error_s REAL NOT NULL, samples INTEGER NOT NULL)""",
        """CREATE TABLE phases (
            id INTEGER PRIMARY KEY, device TEXT NOT NULL, job_id TEXT NOT NULL,
            attempt INTEGER NOT NULL, kind TEXT NOT NULL, idx INTEGER NOT NULL,
            t_start_host_s REAL NOT NULL, t_end_host_s REAL NOT NULL,
            UNIQUE (device, job_id, attempt, kind, idx))""",
        """CREATE TABLE results (
            job_id TEXT PRIMARY KEY, device TEXT NOT NULL, attempt INTEGER NOT NULL,
            status TEXT NOT NULL, method TEXT, test_accuracy REAL, train_accuracy REAL,
            test_loss REAL, epochs INTEGER, steps INTEGER, mean_epoch_s REAL,
            seconds_total REAL, peak_tensor_bytes INTEGER, peak_hwm_bytes INTEGER,
            peak_rss_delta_bytes INTEGER, metrics_json TEXT)""",
    ),
    # a meter's own cumulative energy counter at the sample (UM: the selected group's mWh)
    2: ("ALTER TABLE power_samples ADD COLUMN counter_wh REAL",),
    # one name for the tensor-level peak everywhere (the `memory` event's field)
    3: ("ALTER TABLE memory_samples RENAME COLUMN tensor_peak_bytes TO peak_tensor_bytes",),
}

SCHEMA_VERSION = max(MIGRATIONS)


def latest_version() -> int:
    """The version this code writes, looked up at call time (tests add versions)."""
    return max(MIGRATIONS)

# Every table, in the order readers list them (`schema_version` is the store's own).
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


def stored_version(conn: sqlite3.Connection) -> int:
    """The schema version a store was last migrated to (0: before versioning, or empty)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the store to the latest version, backing up a non-empty older store first."""
    latest = latest_version()
    current = stored_version(conn)
    if current > latest:
        raise SchemaError(
            f"{path}: schema version {current} is newer than this harness ({latest})"
        )
    if current == latest:
        return current
    if current > 0:
        backup_path = path.with_name(f"{path.name}.v{current}.bak")
        backup = sqlite3.connect(backup_path)
        with backup:
            conn.backup(backup)
        backup.close()
    conn.execute("BEGIN IMMEDIATE")
    try:
        if current == 0:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_s REAL)")
        for version in range(current + 1, latest + 1):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return latest


def expected_tables() -> set[str]:
    """The tables a store of the latest version has (from the migrations themselves)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(conn, Path(":memory:"))
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {name for (name,) in rows}
    finally:
        conn.close()


def check_schema(conn: sqlite3.Connection, path: Path) -> int:
    """Refuse a store that is not one, is newer than this harness, or lacks a table.

    Returns its version. Older stores pass (`migrate` brings them up to date when opened
    for writing; readers cope with what they hold).
    """
    version = stored_version(conn)
    latest = max(MIGRATIONS)
    if version == 0:
        raise SchemaError(f"{path}: not a run store (it has no schema version)")
    if version > latest:
        raise SchemaError(
            f"{path}: schema version {version} is newer than this harness ({latest}); "
            "read it with the harness that wrote it (see its manifest.json)"
        )
    present = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    missing = sorted(expected_tables() - present) if version == latest else []
    if missing:
        raise SchemaError(
            f"{path}: the run store lacks table(s) {', '.join(missing)}: it is damaged"
        )
    return version
