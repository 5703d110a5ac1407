"""A frozen agent no longer stalls a run: heartbeats, a stall timeout and a wall-clock limit.

Real sshd devices from the lab; the agent is frozen with SIGSTOP (as a hung device would
be). The job ends as `stalled`, the agent is stopped (nothing left on the device), the
device goes on with its next jobs, and everything recorded before the freeze is kept.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from fleet import (  # noqa: F401
    REPO_ROOT,
    lab_factory,
    processes_under,
    requires_sshd,
    wait_until,
)

from harness.exit_codes import ExitStatus

pytestmark = requires_sshd

PLAN = """\
idle_baseline_s: 120
cooldown_s: 0
stall_timeout_s: 4
telemetry: {memory_hz: 2, power_hz: 1, step_every: 1, heartbeat_s: 1}
datasets: {digits: {}}
matrix:
  - methods: [{name: standard, label: forever}]
    models: [mlp]
    datasets: [digits]
    batch_sizes: [8]
    epochs: 1000
    wall_clock_s: 3
    stall_timeout_s: 120  # importing torch may hold the GIL for seconds on a loaded machine
  - methods: [standard]
    models: [mlp]
    datasets: [digits]
    batch_sizes: [100]
    epochs: 1
    max_steps: 2
    stall_timeout_s: 120
"""


def test_frozen_agent_is_stalled_stopped_and_the_device_goes_on(lab_factory, tmp_path):  # noqa: F811
    lab = lab_factory(1)
    (tmp_path / "plan.yaml").write_text(PLAN)
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", "--devices", str(lab.inventory_path),
         "--plan", str(tmp_path / "plan.yaml"), "--out", str(tmp_path / "runs"),
         "--run-id", "s"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    workdir = lab.device("dev1").workdir
    events = Path(workdir) / "jobs" / "idle-dev1" / "events.jsonl"
    try:
        if not wait_until(lambda: events.exists() and '"heartbeat"' in events.read_text(), 90):
            process.kill()
            raise AssertionError(process.communicate()[1][-3000:])
        hello = json.loads(events.read_text().splitlines()[0])
        agent = hello["data"]["pid"]
        os.kill(agent, signal.SIGSTOP)  # frozen: no event, no heartbeat, no exit
        frozen_at = time.monotonic()
        db_path = tmp_path / "runs" / "s" / "run.sqlite"
        time.sleep(1.0)
        db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
        before = set(db.execute("SELECT * FROM events WHERE job_id = 'idle-dev1'").fetchall())
        db.close()
        assert any('"heartbeat"' in row[-1] for row in before)
        _, err = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == ExitStatus.PARTIAL, err[-3000:]
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    jobs = {r[0]: r[1:] for r in db.execute("SELECT job_id, status, reason, t_end_host_s "
                                            "FROM jobs")}
    after = set(db.execute("SELECT * FROM events WHERE job_id = 'idle-dev1'").fetchall())
    db.close()
    assert jobs["idle-dev1"][0] == "stalled", jobs
    assert "no event from the agent for 4 s" in jobs["idle-dev1"][1]
    assert jobs["mlp-digits-forever-b8-s0-r0"][0] == "timed_out", jobs
    assert "after 3 s (wall_clock_s)" in jobs["mlp-digits-forever-b8-s0-r0"][1]
    assert jobs["mlp-digits-standard-b100-s0-r0"][0] == "completed", jobs
    assert before <= after  # nothing recorded before the freeze was lost
    assert time.monotonic() - frozen_at < 200
    try:
        os.kill(agent, 0)
        raise AssertionError(f"frozen agent {agent} still exists")
    except ProcessLookupError:
        pass
    assert wait_until(lambda: not processes_under(workdir), 15), processes_under(workdir)
