"""Devices whose sshd has no sftp subsystem (minimal images, dropbear): files go over exec.

A real sshd with its `Subsystem sftp` line removed: `devices check` reports it without
a traceback, and `harness run` deploys the code, the data set and the job specs over
the exec channel (as Ansible does) and completes every job.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fleet import harness, lab_factory, requires_sshd, write_plan  # noqa: F401

from harness.exit_codes import ExitStatus

pytestmark = requires_sshd

JOBS = """\
  - methods: [standard]
    models: [mlp]
    datasets: [digits]
    batch_sizes: [32]
    epochs: 1
    max_steps: 2
"""


def test_device_without_sftp_is_checked_and_runs(lab_factory, tmp_path: Path):  # noqa: F811
    lab = lab_factory(1)
    device = lab.device("dev1")
    config = device.config_file.read_text()
    assert "Subsystem sftp" in config
    device.config_file.write_text(
        "".join(line for line in config.splitlines(keepends=True) if "Subsystem" not in line)
    )
    lab.kill_sshd("dev1")
    lab.start("dev1")
    check = harness("devices", "check", "--devices", str(lab.inventory_path), "--format",
                    "json")
    assert "Traceback" not in check.stderr, check.stderr
    assert check.returncode == ExitStatus.OK, check.stderr + check.stdout
    plan = write_plan(tmp_path / "plan.yaml", idle_s=1, jobs=JOBS)
    result = harness("run", "--devices", str(lab.inventory_path), "--plan", str(plan),
                     "--out", str(tmp_path / "runs"), "--run-id", "nosftp")
    assert result.returncode == ExitStatus.OK, result.stderr[-3000:]
    db_path = tmp_path / "runs" / "nosftp" / "run.sqlite"
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    statuses = dict(db.execute("SELECT job_id, status FROM jobs").fetchall())
    db.close()
    assert set(statuses.values()) == {"completed"}, statuses
    deployed = Path(device.workdir) / "code" / "device_agent" / "job.py"
    assert deployed.read_bytes() == (Path(__file__).resolve().parents[2] / "device_agent" /
                                     "job.py").read_bytes()
