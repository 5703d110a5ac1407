"""SIGKILL the harness mid-run, then `--resume`: nothing completed reruns, nothing is lost twice."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from runs import table_ready

from harness.exit_codes import ExitStatus

REPO = Path(__file__).resolve().parents[2]


PLAN = """\
idle_baseline_s: 1
cooldown_s: 0
telemetry: {memory_hz: 20}
datasets: {digits: {}}
matrix:
  - methods: [standard, lowmem]
    models: [mlp]
    datasets: [digits]
    seeds: [0]
    epochs: 20
    max_steps: 250
"""
# Jobs long enough (~1 s even on the fused kernels) for the poll below to catch one mid-run.

TABLES = {
    "events": "device, job_id, attempt, line_no, seq, kind, raw_json",
    "memory_samples": "device, job_id, attempt, seq, rss_bytes, t_host_s",
    "power_samples": "device, meter, t_host_s, power_w",
    "clock_offsets": "device, job_id, attempt, phase, offset_s",
}


def snapshot(db_path: Path) -> dict[str, dict[int, tuple]]:
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    try:
        return {
            table: {row[0]: row[1:] for row in db.execute(f"SELECT id, {cols} FROM {table}")}
            for table, cols in TABLES.items()
        }
    finally:
        db.close()


def test_sigkill_then_resume_finishes_only_what_did_not_complete(tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "harness", "run", "--plan", "plan.yaml", "--run-id", "r"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    db_path = tmp_path / "runs" / "r" / "run.sqlite"
    deadline = time.monotonic() + 400
    killed_pid = None
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if not db_path.exists():
            continue
        if not table_ready(db_path):
            continue
        db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
        done = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE status = 'completed' AND kind = 'train'"
        ).fetchone()[0]
        running = db.execute(
            "SELECT e.raw_json FROM jobs j JOIN events e ON e.job_id = j.job_id "
            "WHERE j.status = 'running' AND e.kind = 'hello' AND EXISTS (SELECT 1 FROM events s "
            "WHERE s.job_id = j.job_id AND s.kind = 'step')"
        ).fetchone()
        db.close()
        if done >= 1 and running:
            proc.send_signal(signal.SIGKILL)
            killed_pid = json.loads(running[0])["data"]["pid"]
            break
    proc.wait(30)
    assert killed_pid is not None, "never caught a job mid-run after one had completed"
    # The orphaned agent notices the host is gone and stops by itself.
    for _ in range(100):
        try:
            os.kill(killed_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"agent {killed_pid} still running after the harness died")
    before = snapshot(db_path)
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    completed_before = {
        r[0] for r in db.execute("SELECT job_id FROM jobs WHERE status = 'completed'")
    }
    db.close()
    assert before["power_samples"] and before["memory_samples"]

    resumed = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--resume", "runs/r"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == ExitStatus.OK, resumed.stderr[-3000:]
    after = snapshot(db_path)
    for table, rows in before.items():  # every recorded row is still there, unchanged
        assert {k: after[table][k] for k in rows} == rows, table
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    jobs = {r[0]: r[1:] for r in db.execute("SELECT job_id, status, attempts FROM jobs")}
    assert len(jobs) == 3 and all(status == "completed" for status, _ in jobs.values())
    for job_id in completed_before:  # not rerun
        assert jobs[job_id][1] == 1
        attempts = {
            r[0]
            for r in db.execute("SELECT DISTINCT attempt FROM events WHERE job_id = ?", (job_id,))
        }
        assert attempts == {1}
    rerun = [job_id for job_id, (_, n) in jobs.items() if n == 2]
    assert len(rerun) == 1  # the killed job; its partial attempt-1 events are kept
    partial = db.execute(
        "SELECT COUNT(*), SUM(kind = 'job_end') FROM events WHERE job_id = ? AND attempt = 1",
        (rerun[0],),
    ).fetchone()
    assert partial[0] > 0 and partial[1] == 0
    for table, key in (
        ("power_samples", "device, meter, t_host_s"),
        ("memory_samples", "device, job_id, attempt, seq"),
        ("events", "device, job_id, attempt, line_no"),
    ):
        total = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        distinct = db.execute(f"SELECT COUNT(*) FROM (SELECT DISTINCT {key} FROM {table})")
        assert distinct.fetchone()[0] == total, table
    manifest = json.loads((tmp_path / "runs" / "r" / "manifest.json").read_text())
    assert manifest["resumes"][0]["incomplete_jobs"] == rerun
