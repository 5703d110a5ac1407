"""A run directory's life: locked while a harness runs it, resumable whatever stopped it.

Real `harness run` processes on this machine (local device) and on real sshd devices:
two harnesses on one run, a run that fails before its first job (busy dashboard port),
`--resume` from another directory, a changed inventory, `${VAR}` secrets in `meter:`,
and skipped jobs (a changed host key) finished by `--resume`. Rows are counted before
and after each fault: nothing recorded is lost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from fleet import lab_factory, requires_sshd, wait_until, write_plan  # noqa: F401
from runs import table_ready

from harness.exit_codes import ExitStatus

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TABLES = ("events", "memory_samples", "power_samples", "clock_offsets", "phases", "results")

PLAN = """\
idle_baseline_s: {idle}
cooldown_s: 0
telemetry: {{memory_hz: 5, power_hz: 1, step_every: 1}}
datasets: {{digits: {{}}}}
matrix:
  - methods: [standard]
    models: [mlp]
    datasets: [digits]
    batch_sizes: [100]
    epochs: 1
    max_steps: 2
"""


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def rows(db_path: Path) -> dict[str, set[tuple]]:
    """Every row of the recorded tables, by content (ids included)."""
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    try:
        return {t: set(db.execute(f"SELECT * FROM {t}").fetchall()) for t in TABLES}
    finally:
        db.close()


def statuses(db_path: Path) -> dict[str, tuple[str, int]]:
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    try:
        return {r[0]: (r[1], r[2]) for r in db.execute("SELECT job_id, status, attempts FROM jobs")}
    finally:
        db.close()


def local_inventory(path: Path, meter: str = "") -> Path:
    path.write_text(f"devices:\n  - name: local\n    transport: local\n{meter}")
    return path


def test_second_harness_on_a_run_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    local_inventory(tmp_path / "inv.yaml")
    (tmp_path / "plan.yaml").write_text(PLAN.format(idle=4))
    first = start("run", "--devices", "inv.yaml", "--plan", "plan.yaml", "--run-id", "r",
                  cwd=tmp_path)
    db_path = tmp_path / "runs" / "r" / "run.sqlite"
    try:
        assert wait_until(lambda: db_path.exists() and table_ready(db_path) and any(
            s == "running" for s, _ in statuses(db_path).values()), 60)
        started = time.monotonic()
        second = run("run", "--resume", "runs/r", cwd=tmp_path, timeout=60)
        assert time.monotonic() - started < 15  # at once, not after the first one ends
        assert second.returncode == ExitStatus.ERROR, second.stderr
        assert "another harness is running this run" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one was not disturbed
        first.send_signal(signal.SIGKILL)  # the kernel releases its lock
        first.wait(10)
    finally:
        first.kill()
    before = rows(db_path)
    # Two resumes at once: exactly one runs the jobs, the other is refused.
    a = start("run", "--resume", "runs/r", cwd=tmp_path)
    b = start("run", "--resume", "runs/r", cwd=tmp_path)
    results = [p.communicate(timeout=300) for p in (a, b)]
    codes = sorted([a.returncode, b.returncode])
    assert codes == [ExitStatus.OK, ExitStatus.ERROR], results
    refused = results[[a.returncode, b.returncode].index(ExitStatus.ERROR)][1]
    assert "another harness is running this run" in refused
    after = rows(db_path)
    for table in TABLES:
        assert before[table] <= after[table], table  # nothing recorded before was lost
    jobs = statuses(db_path)
    assert all(status == "completed" for status, _ in jobs.values())
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    agents = db.execute("SELECT job_id, attempt, COUNT(*) FROM events WHERE kind = 'hello' "
                        "GROUP BY job_id, attempt").fetchall()
    db.close()
    assert agents and all(n == 1 for _, _, n in agents), agents  # one agent per attempt


def test_run_failing_before_its_first_job_is_resumable_from_anywhere_without_secrets(tmp_path):
    first_dir, other_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    other_dir.mkdir()
    secret = "s3cr3t-meter-name-7f1c"
    local_inventory(first_dir / "inv.yaml", "    meter: {type: modeled, profile: host, "
                    "interval_s: 0.05, name: '${BNN_TEST_METER_NAME}'}\n")
    (first_dir / "plan.yaml").write_text(PLAN.format(idle=1))
    env = {**ENV, "BNN_TEST_METER_NAME": secret}
    with socket.socket() as busy:  # the dashboard's port is taken
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        failed = subprocess.run(
            [sys.executable, "-m", "harness", "run", "--devices", "inv.yaml", "--plan",
             "plan.yaml", "--run-id", "r", "--dashboard", str(port)],
            cwd=first_dir, env=env, capture_output=True, text=True, timeout=120,
        )
    assert failed.returncode == ExitStatus.USAGE, failed.stderr
    assert f"127.0.0.1:{port}" in failed.stderr and "--resume" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    run_dir = first_dir / "runs" / "r"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["inventory"]["path"] == str((first_dir / "inv.yaml").resolve())
    # Resumed from another working directory: the manifest's inventory path is absolute.
    resumed = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--resume", str(run_dir)],
        cwd=other_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == ExitStatus.OK, resumed.stderr[-3000:]
    assert all(s == "completed" for s, _ in statuses(run_dir / "run.sqlite").values())
    # The meter's ${VAR} is kept as the reference; its value is nowhere in the run.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["power"]["meters"]["local"]["name"] == "${BNN_TEST_METER_NAME}"
    assert manifest["datasets"] and manifest["datasets"][0]["name"] == "digits"
    # A changed inventory is noticed on the next resume (nothing left to run here).
    with (first_dir / "inv.yaml").open("a") as handle:
        handle.write("# edited\n")
    again = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--resume", str(run_dir)],
        cwd=other_dir, env=env, capture_output=True, text=True, timeout=120,
    )
    assert again.returncode == ExitStatus.OK, again.stderr
    said = " ".join(again.stderr.split())  # rich wraps long lines
    assert f"{(first_dir / 'inv.yaml').resolve()} changed since the run started" in said
    assert "0 job(s) to run" in said


def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    result = run("run", "--out", "runs", cwd=tmp_path, timeout=60)
    assert result.returncode == ExitStatus.USAGE
    assert result.stderr.strip() == "error: --out: runs is a file, not a directory of runs"


@requires_sshd
def test_jobs_skipped_for_a_changed_host_key_run_on_resume(lab_factory, tmp_path):  # noqa: F811
    lab = lab_factory(2)
    jobs = ("  - methods: [standard]\n    models: [mlp]\n    datasets: [digits]\n"
            "    batch_sizes: [32]\n    epochs: 1\n    max_steps: 1\n    devices: [dev2]\n")
    plan = write_plan(tmp_path / "plan.yaml", idle_s=1, jobs=jobs)
    good_known_hosts = lab.known_hosts_path.read_text()
    other_key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)],
                   check=True)
    dev2 = lab.device("dev2")
    lines = [
        line if not line.startswith(f"[{dev2.host}]:{dev2.port} ")
        else f"[{dev2.host}]:{dev2.port} " + " ".join(
            other_key.with_suffix(".pub").read_text().split()[:2]) + "\n"
        for line in good_known_hosts.splitlines(keepends=True)
    ]
    lab.known_hosts_path.write_text("".join(lines))  # dev2's key "changed"
    first = run("run", "--devices", str(lab.inventory_path), "--plan", str(plan), "--out",
                str(tmp_path / "runs"), "--run-id", "hk", cwd=tmp_path)
    assert first.returncode == ExitStatus.PARTIAL, first.stderr[-3000:]
    db_path = tmp_path / "runs" / "hk" / "run.sqlite"
    before_status = statuses(db_path)
    assert before_status["idle-dev1"][0] == "completed"
    assert before_status["idle-dev2"][0] == "skipped"
    assert before_status["mlp-digits-standard-b32-s0-r0"][0] == "skipped"
    before = rows(db_path)
    lab.known_hosts_path.write_text(good_known_hosts)  # the user checked and fixed the key
    resumed = run("run", "--resume", str(tmp_path / "runs" / "hk"), cwd=tmp_path)
    assert resumed.returncode == ExitStatus.OK, resumed.stderr[-3000:]
    after_status = statuses(db_path)
    assert all(s == "completed" for s, _ in after_status.values()), after_status
    assert after_status["idle-dev1"][1] == 1  # completed before: not run again
    after = rows(db_path)
    for table in TABLES:
        assert before[table] <= after[table], table
