"""The store writer never dies: a bad record is rejected alone; a full disk stops the run cleanly.

The faults come from real processes: an agent (a wrapper around the real one, as a
device with a broken firmware would be) that sends valid-JSON lines with integers
beyond 64 bits, and a run store on a real tmpfs that fills up mid-run.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.exit_codes import ExitStatus
from harness.store import EventRecord, MemorySample, RunStore

REPO = Path(__file__).resolve().parents[2]


def _event(line_no: int, seq: int, raw: object = "{}") -> EventRecord:
    return EventRecord("dev", "job", 1, line_no, raw, time.time(), seq=seq, kind="step")


def counts(db_path: Path) -> dict[str, int]:
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    try:
        return {
            table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("events", "memory_samples", "power_samples", "jobs", "clock_offsets")
        }
    finally:
        db.close()


def test_a_bad_record_is_rejected_alone_and_the_writer_lives_on(tmp_path):
    store = RunStore.create(tmp_path / "run").start()
    try:
        store.add_events([_event(i, i) for i in range(10)])
        store.add_events([_event(10, 2**64)])  # OverflowError in sqlite3's binding
        store.add_events([_event(11, 11, raw=object())])  # a type SQLite cannot bind
        store.add_memory_samples(
            [MemorySample("dev", "job", 1, 5, 1.0, 1.0, 1, 10**30, None, None, None, None)]
        )
        store.add_events([_event(i, i) for i in range(12, 22)])
        store.flush(5)
        assert store.rejected_rows == 3
        assert len(store.write_errors) == 3 and "OverflowError" in store.write_errors[0]
        assert store.query("SELECT COUNT(*) AS n FROM events")[0]["n"] == 20
        store.add_events([_event(22, 22)])  # the writer is still there
        store.flush(5)
        assert store.query("SELECT COUNT(*) AS n FROM events")[0]["n"] == 21
    finally:
        store.close()


# A device's python that runs the real agent and slips hostile lines into its stream.
HOSTILE_PYTHON = """\
#!{python}
import os, subprocess, sys
args = sys.argv[1:]
if args[:3] != ["-m", "device_agent", "run"]:
    os.execv(sys.executable, [sys.executable, *args])
agent = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE)
out = sys.stdout.buffer
out.write(agent.stdout.readline())  # hello
job_id = os.path.basename(os.path.dirname(args[3]))
for line in {lines!r}:
    out.write(line.replace("JOB", job_id).encode() + b"\\n")
out.flush()
for line in agent.stdout:
    out.write(line)
    out.flush()
sys.exit(agent.wait())
"""
HOSTILE_LINES = [
    '{"v":1,"kind":"step","job_id":"JOB","seq":18446744073709551616,"t_mono_ns":1,'
    '"t_wall_s":1.0,"data":{}}',
    '{"v":1,"kind":"memory","job_id":"JOB","seq":900,"t_mono_ns":1,"t_wall_s":1.0,'
    '"data":{"rss_bytes":18446744073709551616,"step":99999999999999999999999}}',
    '{"v":1,"kind":"epoch_start","job_id":"JOB","seq":901,"t_mono_ns":1,"t_wall_s":1.0,'
    '"data":{"epoch":18446744073709551616}}',
    '{"v":1,"kind":"power","job_id":"JOB","seq":902,"t_mono_ns":1,"t_wall_s":1.0,'
    '"data":{"power_w":1e999}}',
    '{"v":1,"kind":"step","job_id":"JOB","seq":903,"t_mono_ns":1,"t_wall_s":NaN,"data":{}}',
]


def _hostile_device(tmp_path: Path) -> Path:
    python = tmp_path / "hostile-python"
    python.write_text(HOSTILE_PYTHON.format(python=sys.executable, lines=HOSTILE_LINES))
    python.chmod(0o755)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        f"devices:\n  - name: local\n    transport: local\n    python: {python}\n"
    )
    return inventory


PLAN = """\
idle_baseline_s: 1
cooldown_s: 0
telemetry: {memory_hz: 5, power_hz: 1, step_every: 1}
datasets: {digits: {}}
matrix:
  - methods: [standard]
    models: [mlp]
    datasets: [digits]
    batch_sizes: [100]
    epochs: 1
    max_steps: 3
"""


def test_device_sending_out_of_range_integers_loses_nothing(tmp_path):
    inventory = _hostile_device(tmp_path)
    (tmp_path / "plan.yaml").write_text(PLAN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--devices", str(inventory), "--plan",
         "plan.yaml", "--run-id", "r"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == ExitStatus.OK, result.stderr[-3000:]
    assert "did not commit" not in result.stderr and "Traceback" not in result.stderr
    run_dir = tmp_path / "runs" / "r"
    db = sqlite3.connect(f"{(run_dir / 'run.sqlite').as_uri()}?mode=ro", uri=True)
    statuses = dict(db.execute("SELECT job_id, status FROM jobs").fetchall())
    assert set(statuses.values()) == {"completed"} and len(statuses) == 2
    for job_id in statuses:
        mirrored = (run_dir / "devices" / "local" / "jobs" / job_id / "events.jsonl")
        agent_lines = len(mirrored.read_text().splitlines())
        stored, malformed = db.execute(
            "SELECT COUNT(*), SUM(malformed_reason IS NOT NULL) FROM events WHERE job_id = ?",
            (job_id,),
        ).fetchone()
        # every line the agent wrote, plus the hostile ones: nothing lost
        assert stored == agent_lines + len(HOSTILE_LINES), job_id
        # each is refused by the contract (envelope or payload) and kept as malformed
        assert malformed == len(HOSTILE_LINES)
    assert not db.execute("SELECT 1 FROM memory_samples WHERE seq = 900").fetchall()
    assert db.execute("SELECT COUNT(*) FROM power_samples WHERE power_w > 1e300").fetchone()[0] == 0
    db.close()


# ---------------------------------------------------------------- a full disk


def _mount_tmpfs(target: Path, size: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                          capture_output=True)
    return done.returncode == 0


FILLS_THE_DISK = textwrap.dedent("""\
    import sys, time
    from harness.store import EventRecord, RunStore
    store = RunStore.open(sys.argv[1]).start()
    big = "x" * 200_000
    n = 0
    while store.fatal_error is None and n < 2000:
        store.add_events([EventRecord("d", "j", 1, n, big, time.time(), seq=n, kind="step")])
        n += 1
        if n % 5 == 0:
            store.flush(30)
    store.close()
    print(store.fatal_error)
    print(store.lost_rows)
""")


def test_full_disk_is_named_and_committed_rows_are_kept(tmp_path):
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        store = RunStore.create(mount / "run").start()
        store.add_events([EventRecord("d", "j", 0, i, "{}", 0.0, seq=i) for i in range(-50, 0)])
        store.close()
        before = counts(mount / "run" / "run.sqlite")
        result = subprocess.run([sys.executable, "-c", FILLS_THE_DISK, str(mount / "run")],
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        fatal, lost = result.stdout.strip().splitlines()[-2:]
        assert "the disk is full" in fatal and int(lost) > 0
        assert "cannot rollback" not in result.stderr + result.stdout
        after = counts(mount / "run" / "run.sqlite")
        assert after["events"] >= before["events"] + 5  # what was committed is kept
        db = sqlite3.connect(f"{(mount / 'run' / 'run.sqlite').as_uri()}?mode=ro", uri=True)
        assert db.execute("SELECT COUNT(*) FROM events WHERE job_id = 'j' AND attempt = 0"
                          ).fetchone()[0] == 50
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


FLOODING_PLAN = """\
idle_baseline_s: 8
cooldown_s: 0
telemetry: {memory_hz: 1000, power_hz: 1, step_every: 1}
datasets: {digits: {}}
matrix:
  - methods: [standard]
    models: [mlp]
    datasets: [digits]
    epochs: 1
    max_steps: 2
"""


def test_run_on_a_full_disk_stops_cleanly_and_resumes_after(tmp_path):
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    (tmp_path / "plan.yaml").write_text(FLOODING_PLAN)
    (tmp_path / "inventory.yaml").write_text(
        "devices:\n  - name: local\n    transport: local\n"
    )
    db_path = mount / "r" / "run.sqlite"
    try:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "harness", "run", "--devices", "inventory.yaml", "--plan",
             "plan.yaml", "--out", str(mount), "--run-id", "r"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        seen: dict[str, int] = {}
        while process.poll() is None and time.monotonic() - started < 120:
            time.sleep(0.5)
            try:
                now = counts(db_path)
            except sqlite3.Error:
                continue
            seen = {k: max(v, seen.get(k, 0)) for k, v in now.items()}
        _, err = process.communicate(timeout=60)
        assert process.returncode == ExitStatus.ERROR, err[-3000:]
        assert time.monotonic() - started < 60  # stopped, not run to the end
        assert "the disk is full" in err and "--resume" in err, err[-3000:]
        assert "Traceback" not in err and "cannot rollback" not in err
        after = counts(db_path)
        assert seen["events"] > 0
        assert all(after[k] >= seen[k] for k in seen), (seen, after)  # nothing committed lost
        # Space again: the run is finished by --resume, and the rows are all still there.
        subprocess.run(["mount", "-o", "remount,size=256m", str(mount)], check=True)
        resumed = subprocess.run(
            [sys.executable, "-m", "harness", "run", "--resume", str(mount / "r")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert resumed.returncode == ExitStatus.OK, resumed.stderr[-3000:]
        final = counts(db_path)
        assert all(final[k] >= after[k] for k in after)
        db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
        assert {s for (s,) in db.execute("SELECT status FROM jobs")} == {"completed"}
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
