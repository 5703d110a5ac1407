"""The run store's writer: `runs/<run-id>/run.sqlite` (+ `manifest.json`); the only module that
writes SQL.

Many producers (a thread per device, a thread per meter) call the `add_*` /
`set_*` methods, which only enqueue; one writer thread, started explicitly
(`with RunStore.create(run_dir) as store:` or `store.start()`, so opening a store to look
at it never starts a thread, and a write before the start is refused), commits what is queued
in one transaction at least every `COMMIT_INTERVAL_S`, so a sample is on disk
within a second of being handed over. WAL mode lets the dashboard and notebooks
read (`runstore.reader.StoreReader`, which `query` uses too) while the harness
writes. The schema (`runstore.schema`) is versioned; opening an older store backs
it up and migrates it. `docs/run-store.md` documents every table and column.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, HarnessUsageError
from harness.store.records import EventRecord, MemorySample, PlannedJob
from runstore.reader import StoreReader
from runstore.schema import (
    DB_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SchemaError,
    check_schema,
    migrate,
)

COMMIT_INTERVAL_S = 0.25
BUSY_TIMEOUT_S = 10.0
# At most this many rejected-record messages are kept and printed (all are counted).
MAX_WRITE_ERRORS_KEPT = 100

__all__ = [
    "SCHEMA_VERSION",
    "EventRecord",
    "MemorySample",
    "PlannedJob",
    "RunStore",
]

JOB_STATUSES = (
    "pending",
    "running",
    "completed",
    "failed",
    "oom",
    "interrupted",
    "incomplete",
    "skipped",
    "stalled",  # no event for the job's stall timeout; the agent was stopped
    "timed_out",  # ran past the job's wall-clock limit; the agent was stopped
)


@dataclass
class _Write:
    sql: str
    rows: list[Sequence[Any]]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
    )
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class RunStore:
    """One run's store. `RunStore.create(run_dir)` / `RunStore.open(run_dir)` open it; its
    writer starts with `start()` (or `with ... as store:`) and stops with `close()`."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection) -> None:
        self.run_dir = run_dir
        self.db_path = run_dir / DB_NAME
        self._conn = conn
        self._queue: queue.Queue[_Write | threading.Event | None] = queue.Queue()
        self._closed = False
        self.write_errors: list[str] = []
        self.rejected_rows = 0  # bad records dropped alone (see _commit)
        self.fatal_error: str | None = None  # set when nothing more can be written (disk full)
        self.lost_rows = 0  # rows not written because of `fatal_error`
        self._read_lock = threading.Lock()
        self._reader: StoreReader | None = None
        self._writer = threading.Thread(target=self._write_loop, name="run-store", daemon=True)

    # ------------------------------------------------------------ life cycle

    @classmethod
    def create(cls, run_dir: Path) -> RunStore:
        run_dir = Path(run_dir)
        if (run_dir / DB_NAME).exists():
            raise HarnessUsageError(f"{run_dir}: a run store already exists there (use --resume)")
        run_dir.mkdir(parents=True, exist_ok=True)
        return cls._open_path(run_dir)

    @classmethod
    def open(cls, run_dir: Path) -> RunStore:
        run_dir = Path(run_dir)
        if not (run_dir / DB_NAME).is_file():
            raise HarnessUsageError(f"{run_dir}: no {DB_NAME} (not a run directory)")
        return cls._open_path(run_dir)

    @classmethod
    def _open_path(cls, run_dir: Path) -> RunStore:
        path = run_dir / DB_NAME
        conn = None
        try:
            conn = _connect(path)
            migrate(conn, path)
            check_schema(conn, path)
        except (sqlite3.DatabaseError, HarnessError) as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, HarnessError):
                raise
            raise HarnessError(f"{path}: cannot open the run store: {exc}") from exc
        except SchemaError as exc:
            if conn is not None:
                conn.close()
            raise HarnessError(str(exc)) from exc
        return cls(run_dir, conn)

    def start(self) -> RunStore:
        """Start the writer thread (once); returns the store, so `RunStore.open(d).start()`."""
        if self._closed:
            raise HarnessError(f"{self.db_path}: start after close")
        if not self.started:
            self._writer.start()
        return self

    @property
    def started(self) -> bool:
        return self._writer.ident is not None

    def __enter__(self) -> RunStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Commit everything queued, stop the writer, close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.started:
            self._queue.put(None)
            self._writer.join(timeout_s)
        self._conn.close()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()

    # ------------------------------------------------------------ the writer thread

    def _enqueue(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if self._closed:
            raise HarnessError(f"{self.db_path}: write after close")
        if not self.started:
            raise HarnessError(
                f"{self.db_path}: write before start() (open the store with "
                "`with RunStore.create(...) as store:` or call store.start())"
            )
        if rows:
            self._queue.put(_Write(sql, rows))

    def flush(self, timeout_s: float = 10.0) -> None:
        """Block until everything enqueued before this call is committed."""
        if self._closed or not self.started:  # nothing can be queued
            return
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout_s):
            raise HarnessError(f"{self.db_path}: the store writer did not commit in {timeout_s} s")

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=COMMIT_INTERVAL_S)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + COMMIT_INTERVAL_S
            while time.monotonic() < deadline:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            writes = [item for item in batch if isinstance(item, _Write)]
            self._commit(writes)
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
                elif item is None:
                    stopping = True

    def _commit(self, writes: list[_Write]) -> None:
        """Commit a batch; a write that fails is retried alone, then row by row.

        Whatever a bad record raises (sqlite3.Error, OverflowError for an integer beyond
        64 bits, TypeError for a value SQLite cannot bind), only that record is dropped and
        counted (`rejected_rows`, `write_errors`); the writer thread never dies. A full disk
        is not a bad record: it sets `fatal_error` and nothing more is written.
        """
        if not writes or self.fatal_error is not None:
            self.lost_rows += sum(len(w.rows) for w in writes)
            return
        try:
            self._execute(writes)
            return
        except Exception as exc:
            if self._is_fatal(exc, writes):
                return
        for write in writes:  # find the bad write, keep the rest
            try:
                self._execute([write])
                continue
            except Exception as exc:
                if self._is_fatal(exc, [write]):
                    return
            for row in write.rows:  # find the bad row(s) of that write
                try:
                    self._execute([_Write(write.sql, [row])])
                except Exception as exc:
                    if self._is_fatal(exc, [_Write(write.sql, [row])]):
                        return
                    self._reject(write, exc)

    def _reject(self, write: _Write, exc: Exception) -> None:
        self.rejected_rows += 1
        table = write.sql.split("(")[0].strip()
        message = f"run store: rejected a record ({type(exc).__name__}: {exc}): {table}"
        if len(self.write_errors) < MAX_WRITE_ERRORS_KEPT:
            self.write_errors.append(message)
            print(message, file=sys.stderr)

    def _is_fatal(self, exc: Exception, writes: list[_Write]) -> bool:
        """A full disk (or a store that cannot be written at all) stops the writing."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY) or (
            isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        ):
            what = "the disk is full" if code == sqlite3.SQLITE_FULL else "cannot write"
            self.fatal_error = f"{self.db_path}: {what} ({exc})"
            self.lost_rows += sum(len(w.rows) for w in writes)
            print(f"run store: {self.fatal_error}; nothing more is recorded", file=sys.stderr)
            return True
        return False

    def _execute(self, writes: list[_Write]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for write in writes:
                conn.executemany(write.sql, write.rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (a full disk)
                with contextlib.suppress(sqlite3.Error):  # the original error is reported
                    conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------ run, devices, jobs

    def set_run_info(self, **values: Any) -> None:
        self._enqueue(
            "INSERT INTO run_info (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(key, json.dumps(value)) for key, value in values.items()],
        )

    def add_device(
        self,
        name: str,
        transport: str,
        host: str | None,
        tags: Sequence[str],
        meter: dict[str, Any] | None,
    ) -> None:
        self._enqueue(
            "INSERT INTO devices (name, transport, host, tags_json, meter_json, updated_host_s) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET transport = "
            "excluded.transport, host = excluded.host, tags_json = excluded.tags_json, "
            "meter_json = excluded.meter_json, updated_host_s = excluded.updated_host_s",
            [(name, transport, host, json.dumps(list(tags)), json.dumps(meter), time.time())],
        )

    def set_device_facts(self, name: str, facts: dict[str, Any]) -> None:
        self._enqueue(
            "UPDATE devices SET facts_json = ?, updated_host_s = ? WHERE name = ?",
            [(json.dumps(facts), time.time(), name)],
        )

    def set_device_status(self, name: str, status: str, reason: str | None = None) -> None:
        self._enqueue(
            "UPDATE devices SET status = ?, reason = ?, updated_host_s = ? WHERE name = ?",
            [(status, reason, time.time(), name)],
        )

    def add_jobs(self, jobs: Sequence[PlannedJob]) -> None:
        """Record the planned jobs; jobs already in the store (a resume) are left as they are."""
        self._enqueue(
            "INSERT OR IGNORE INTO jobs (job_id, plan_index, kind, method, model, dataset, "
            "batch_size, epochs, max_steps, seed, repeat, pinned_json, spec_json) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    j.job_id,
                    j.plan_index,
                    j.kind,
                    j.method,
                    j.model,
                    j.dataset,
                    j.batch_size,
                    j.epochs,
                    j.max_steps,
                    j.seed,
                    j.repeat,
                    json.dumps(list(j.pinned)),
                    json.dumps(j.spec, sort_keys=True),
                )
                for j in jobs
            ],
        )

    def start_job(self, job_id: str, device: str, attempt: int, t_start_host_s: float) -> None:
        self._enqueue(
            "UPDATE jobs SET status = 'running', device = ?, attempts = ?, t_start_host_s = ?, "
            "t_end_host_s = NULL, exit_code = NULL, reason = NULL WHERE job_id = ?",
            [(device, attempt, t_start_host_s, job_id)],
        )

    def finish_job(
        self,
        job_id: str,
        status: str,
        exit_code: int | None,
        reason: str | None,
        t_end_host_s: float,
    ) -> None:
        if status not in JOB_STATUSES:
            raise ValueError(f"unknown job status {status!r}; choose one of {JOB_STATUSES}")
        self._enqueue(
            "UPDATE jobs SET status = ?, exit_code = ?, reason = ?, t_end_host_s = ? "
            "WHERE job_id = ?",
            [(status, exit_code, reason, t_end_host_s, job_id)],
        )

    def mark_unfinished_incomplete(self, reason: str) -> list[str]:
        """On resume: jobs left `running` by a dead harness become `incomplete`; returns them."""
        self.flush()
        ids = self.reader.running_job_ids()
        self._enqueue(
            "UPDATE jobs SET status = 'incomplete', reason = ? WHERE job_id = ?",
            [(reason, job_id) for job_id in ids],
        )
        self.flush()
        return ids

    # ------------------------------------------------------------ streams

    def add_events(self, records: Sequence[EventRecord]) -> None:
        self._enqueue(
            "INSERT OR IGNORE INTO events (device, job_id, attempt, line_no, seq, kind, t_mono_ns, "
            "t_wall_s, t_host_s, t_received_host_s, malformed_reason, raw_json) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.device,
                    r.job_id,
                    r.attempt,
                    r.line_no,
                    r.seq,
                    r.kind,
                    r.t_mono_ns,
                    r.t_wall_s,
                    r.t_host_s,
                    r.t_received_host_s,
                    r.malformed_reason,
                    r.raw_json,
                )
                for r in records
            ],
        )

    def add_memory_samples(self, samples: Sequence[MemorySample]) -> None:
        self._enqueue(
            "INSERT OR IGNORE INTO memory_samples (device, job_id, attempt, seq, t_host_s, "
            "t_wall_s, t_mono_ns, rss_bytes, hwm_bytes, vm_bytes, peak_tensor_bytes, step) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    s.device,
                    s.job_id,
                    s.attempt,
                    s.seq,
                    s.t_host_s,
                    s.t_wall_s,
                    s.t_mono_ns,
                    s.rss_bytes,
                    s.hwm_bytes,
                    s.vm_bytes,
                    s.peak_tensor_bytes,
                    s.step,
                )
                for s in samples
            ],
        )

    def add_power_samples(self, device: str, meter: str, samples: Iterable[Any]) -> None:
        """Samples are objects with t_host_s, power_w, volts, amps, t_meter_s, counter_wh
        (all but the first two may be missing or None)."""
        self._enqueue(
            "INSERT INTO power_samples (device, meter, t_host_s, power_w, volts, amps, t_meter_s, "
            "counter_wh) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    device,
                    meter,
                    s.t_host_s,
                    s.power_w,
                    getattr(s, "volts", None),
                    getattr(s, "amps", None),
                    getattr(s, "t_meter_s", None),
                    getattr(s, "counter_wh", None),
                )
                for s in samples
            ],
        )

    def add_meter_gap(
        self, device: str, meter: str, t_start_s: float, t_end_s: float | None, reason: str
    ) -> None:
        self._enqueue(
            "INSERT INTO meter_gaps (device, meter, t_start_s, t_end_s, reason) "
            "VALUES (?, ?, ?, ?, ?)",
            [(device, meter, t_start_s, t_end_s, reason)],
        )

    def set_meter_stats(
        self,
        device: str,
        meter: str,
        samples: int,
        achieved_hz: float | None,
        rejected_records: int,
        gaps: int,
    ) -> None:
        self._enqueue(
            "INSERT INTO meter_stats (device, meter, samples, achieved_hz, rejected_records, "
            "gaps, updated_host_s) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, meter) DO "
            "UPDATE SET samples = excluded.samples, achieved_hz = excluded.achieved_hz, "
            "rejected_records = excluded.rejected_records, gaps = excluded.gaps, "
            "updated_host_s = excluded.updated_host_s",
            [(device, meter, samples, achieved_hz, rejected_records, gaps, time.time())],
        )

    def add_clock_offset(
        self,
        device: str,
        job_id: str | None,
        attempt: int | None,
        phase: str,
        t_host_s: float,
        offset_s: float,
        rtt_s: float,
        error_s: float,
        samples: int,
    ) -> None:
        self._enqueue(
            "INSERT INTO clock_offsets (device, job_id, attempt, phase, t_host_s, offset_s, "
            "rtt_s, error_s, samples) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(device, job_id, attempt, phase, t_host_s, offset_s, rtt_s, error_s, samples)],
        )

    def add_phase(
        self,
        device: str,
        job_id: str,
        attempt: int,
        kind: str,
        idx: int,
        t_start_host_s: float,
        t_end_host_s: float,
    ) -> None:
        self._enqueue(
            "INSERT OR IGNORE INTO phases (device, job_id, attempt, kind, idx, t_start_host_s, "
            "t_end_host_s) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(device, job_id, attempt, kind, idx, t_start_host_s, t_end_host_s)],
        )

    def set_result(
        self,
        job_id: str,
        device: str,
        attempt: int,
        status: str,
        method: str,
        metrics: dict[str, Any],
    ) -> None:
        keys = (
            "test_accuracy",
            "train_accuracy",
            "test_loss",
            "epochs",
            "steps",
            "mean_epoch_s",
            "seconds_total",
            "peak_tensor_bytes",
            "peak_hwm_bytes",
            "peak_rss_delta_bytes",
        )
        self._enqueue(
            "INSERT OR REPLACE INTO results (job_id, device, attempt, status, method, "
            f"{', '.join(keys)}, metrics_json) VALUES ({', '.join('?' * (len(keys) + 6))})",
            [
                (
                    job_id,
                    device,
                    attempt,
                    status,
                    method,
                    *(metrics.get(k) for k in keys),
                    json.dumps(metrics, default=str),
                )
            ],
        )

    # ------------------------------------------------------------ reads (after flush)

    @property
    def reader(self) -> StoreReader:
        """The store's reader (what is committed so far: `flush()` first for queued writes)."""
        with self._read_lock:
            if self._reader is None:
                self._reader = StoreReader(self.run_dir)
            return self._reader

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Read what is committed so far (call `flush()` first to include queued writes)."""
        return self.reader.query(sql, params)

    # ------------------------------------------------------------ manifest

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        """Write `manifest.json` atomically (temp file + rename)."""
        path = self.run_dir / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
        os.replace(tmp, path)
        return path

    def read_manifest(self) -> dict[str, Any]:
        path = self.run_dir / MANIFEST_NAME
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise HarnessUsageError(f"{path}: cannot read the manifest: {exc}") from exc
