"""The run store on real SQLite: schema, concurrency, durability, readers, migrations."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.errors import HarnessError, HarnessUsageError
from harness.manifest import redact
from harness.store import EventRecord, RunStore
from runstore import schema
from runstore.reader import StoreReader

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Sample:
    t_host_s: float
    power_w: float
    volts: float | None = None
    amps: float | None = None
    t_meter_s: float | None = None


def test_new_store_is_wal_with_a_schema_version_and_all_tables(tmp_path):
    with RunStore.create(tmp_path / "r1") as store:
        store.flush()
        mode = store.query("PRAGMA journal_mode")[0][0]
        versions = [r[0] for r in store.query("SELECT version FROM schema_version")]
        tables = {r[0] for r in store.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert mode == "wal"
    assert versions == sorted(schema.MIGRATIONS)
    assert {
        "devices",
        "jobs",
        "events",
        "power_samples",
        "memory_samples",
        "clock_offsets",
        "results",
        "meter_gaps",
        "meter_stats",
        "phases",
    } <= tables


def test_many_producers_lose_and_duplicate_nothing(tmp_path):
    store = RunStore.create(tmp_path / "r").start()
    per_thread, threads = 400, 8

    def produce(index: int) -> None:
        for i in range(per_thread):
            store.add_power_samples(f"dev{index}", "um25c", [Sample(index * 1e4 + i, float(i))])
            store.add_events([EventRecord(f"dev{index}", "job", 1, i, "{}", 0.0, seq=i)])

    workers = [threading.Thread(target=produce, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    store.add_events([EventRecord("dev0", "job", 1, 0, "{}", 0.0, seq=0)])  # a repeat
    store.close()
    conn = StoreReader(tmp_path / "r").conn
    assert conn.execute("SELECT COUNT(*) FROM power_samples").fetchone()[0] == per_thread * threads
    assert conn.execute("SELECT COUNT(DISTINCT t_host_s) FROM power_samples").fetchone()[0] == (
        per_thread * threads
    )
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == per_thread * threads


def test_a_sample_is_visible_to_a_reader_within_a_second(tmp_path):
    store = RunStore.create(tmp_path / "r").start()
    reader = StoreReader(tmp_path / "r").conn
    delays = []
    for i in range(5):
        handed = time.monotonic()
        store.add_power_samples("d", "m", [Sample(float(i), 1.0)])
        while reader.execute("SELECT COUNT(*) FROM power_samples").fetchone()[0] < i + 1:
            assert time.monotonic() - handed < 1.0, "sample not committed within 1 s"
            time.sleep(0.01)
        delays.append(time.monotonic() - handed)
    store.close()
    assert max(delays) < 1.0


def test_samples_survive_sigkill_of_the_writer_after_a_second(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from dataclasses import dataclass
        from harness.store import RunStore
        @dataclass
        class S:
            t_host_s: float
            power_w: float
        store = RunStore.create({str(tmp_path / "r")!r}).start()
        for i in range(100):
            store.add_power_samples("d", "m", [S(float(i), 2.0)])
        print("queued", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "queued"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    conn = StoreReader(tmp_path / "r").conn
    assert conn.execute("SELECT COUNT(*) FROM power_samples").fetchone()[0] == 100


def test_reader_reads_while_the_writer_writes(tmp_path):
    store = RunStore.create(tmp_path / "r").start()
    stop = threading.Event()
    counts = []

    def read() -> None:
        reader = StoreReader(tmp_path / "r").conn
        while not stop.is_set():
            counts.append(reader.execute("SELECT COUNT(*) FROM power_samples").fetchone()[0])

    thread = threading.Thread(target=read)
    thread.start()
    for i in range(50):
        store.add_power_samples(
            "d", "m", [Sample(float(j), 1.0) for j in range(i * 20, i * 20 + 20)]
        )
        time.sleep(0.01)
    store.close()
    stop.set()
    thread.join()
    assert counts == sorted(counts) and counts[-1] > 0
    reader = StoreReader(tmp_path / "r").conn
    with pytest.raises(sqlite3.OperationalError):
        reader.execute("INSERT INTO power_samples (device, meter, t_host_s) VALUES ('x','y',1)")


def test_migration_backs_up_first_and_refuses_newer_stores(tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    with RunStore.create(run_dir) as store:
        store.add_power_samples("d", "m", [Sample(1.0, 3.0)])
    v1 = dict(schema.MIGRATIONS)
    now = max(v1)
    v2 = {**v1, now + 1: ("ALTER TABLE power_samples ADD COLUMN flags INTEGER",)}
    monkeypatch.setattr(schema, "MIGRATIONS", v2)
    with RunStore.open(run_dir) as store:
        store.flush()
        assert store.query("SELECT MAX(version) FROM schema_version")[0][0] == now + 1
        assert store.query("SELECT flags, power_w FROM power_samples")[0][:] == (None, 3.0)
    backup = sqlite3.connect(run_dir / f"run.sqlite.v{now}.bak")
    assert backup.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == now
    assert backup.execute("SELECT COUNT(*) FROM power_samples").fetchone()[0] == 1
    monkeypatch.setattr(schema, "MIGRATIONS", v1)
    with pytest.raises(HarnessError, match=f"schema version {now + 1} is newer"):
        RunStore.open(run_dir)


def test_bad_paths_and_values_are_refused(tmp_path):
    with RunStore.create(tmp_path / "r") as store, pytest.raises(ValueError, match="'finished'"):
        store.finish_job("j", "finished", 0, None, 0.0)
    with pytest.raises(HarnessUsageError, match="already exists"):
        RunStore.create(tmp_path / "r")
    with pytest.raises(HarnessUsageError, match="not a run directory"):
        RunStore.open(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "run.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(HarnessError, match="cannot open the run store"):
        RunStore.open(tmp_path / "junk")


def test_manifest_redaction_keeps_references_and_removes_values():
    data = {
        "devices": [
            {
                "name": "pi",
                "password": "hunter2",
                "key_passphrase": "${PASS}",
                "meter": {"api_key": "abc", "port": "/dev/rfcomm0"},
            }
        ]
    }
    out = redact(data)
    device = out["devices"][0]
    assert device["password"] == "<redacted>"
    assert device["key_passphrase"] == "${PASS}"
    assert device["meter"] == {"api_key": "<redacted>", "port": "/dev/rfcomm0"}
    assert "hunter2" not in repr(out)


def test_the_writer_starts_only_when_asked_and_stops_for_good(tmp_path):
    """Opening a store starts no thread and writes nothing; a write before `start()` or
    after `close()` is refused with a line naming the store."""
    before = {t.name for t in threading.enumerate()}
    store = RunStore.create(tmp_path / "r")
    assert "run-store" not in {t.name for t in threading.enumerate()} - before
    with pytest.raises(HarnessError, match=r"run\.sqlite: write before start\(\)"):
        store.add_power_samples("d", "m", [Sample(1.0, 3.0)])
    store.flush()  # nothing can be queued: returns at once
    assert store.query("SELECT COUNT(*) FROM power_samples")[0][0] == 0
    assert store.start() is store and store.start() is store  # once, then a no-op
    store.add_power_samples("d", "m", [Sample(1.0, 3.0)])
    store.close()
    assert StoreReader(tmp_path / "r").conn.execute(
        "SELECT COUNT(*) FROM power_samples").fetchone()[0] == 1
    with pytest.raises(HarnessError, match=r"run\.sqlite: write after close"):
        store.add_power_samples("d", "m", [Sample(2.0, 3.0)])
    with pytest.raises(HarnessError, match=r"run\.sqlite: start after close"):
        store.start()
    RunStore.open(tmp_path / "r").close()  # opened, never started: closes cleanly
