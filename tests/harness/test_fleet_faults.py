"""Faults against the real test fleet: a device down, a device lost mid-job, Ctrl-C, a dead host."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fleet import (  # noqa: F401
    REPO_ROOT,
    harness,
    idle_spec,
    lab_factory,
    processes_under,
    requires_sshd,
    wait_until,
    write_plan,
)

from harness.errors import DeviceLost, DeviceUnreachable
from harness.fleet.transport import SshTransport
from harness.inventory import load_inventory
from harness.store import RunStore

pytestmark = requires_sshd

# The matrix job is pinned to dev2, so only idle baselines run on the healthy devices.
PINNED_TO_DEV2 = """\
  - methods: [standard]
    models: [mlp]
    datasets: [digits]
    batch_sizes: [32]
    seeds: [0]
    epochs: 1
    max_steps: 1
    devices: [dev2]
"""


def job_statuses(run_dir: Path) -> dict[str, str]:
    store = RunStore.open(run_dir)
    try:
        return {r["job_id"]: r["status"] for r in store.query("SELECT job_id, status FROM jobs")}
    finally:
        store.close()


def test_unreachable_device_is_skipped_quickly(lab_factory, tmp_path: Path):  # noqa: F811
    lab = lab_factory(3)
    lab.kill_sshd("dev2")
    device = load_inventory(lab.inventory_path).device("dev2")
    started = time.monotonic()
    with pytest.raises(DeviceUnreachable, match=r"after 3 attempt\(s\).*refused"):
        SshTransport(device).open()
    assert time.monotonic() - started < 5  # two retries with 0.5 s, 1 s backoff

    plan = write_plan(tmp_path / "plan.yaml", idle_s=1, jobs=PINNED_TO_DEV2)
    result = harness("run", "--devices", str(lab.inventory_path), "--plan", str(plan),
                     "--out", str(tmp_path / "runs"), "--run-id", "down")
    assert result.returncode == 3, result.stderr
    assert "dev2" in result.stderr and "unreachable" in result.stderr
    statuses = job_statuses(tmp_path / "runs" / "down")
    assert statuses["idle-dev1"] == statuses["idle-dev3"] == "completed"
    assert statuses["idle-dev2"] != "completed"


def test_device_lost_mid_job_others_finish(lab_factory, tmp_path: Path):  # noqa: F811
    lab = lab_factory(3)
    plan = write_plan(tmp_path / "plan.yaml", idle_s=4, jobs=PINNED_TO_DEV2)
    run_dir = tmp_path / "runs" / "lost"
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", "--devices", str(lab.inventory_path),
         "--plan", str(plan), "--out", str(tmp_path / "runs"), "--run-id", "lost"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    dev2 = lab.device("dev2").workdir
    try:
        events = Path(dev2) / "jobs" / "idle-dev2" / "events.jsonl"
        assert wait_until(lambda: events.exists() and "job_start" in events.read_text(), 60)
        time.sleep(0.5)
        lab.kill_sshd("dev2")  # the device vanishes with its sessions
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 3, err
    statuses = job_statuses(run_dir)
    assert statuses["idle-dev1"] == statuses["idle-dev3"] == "completed"
    # Retried (the device could not be reached again), so left unfinished, never "completed".
    assert statuses["idle-dev2"] in ("incomplete", "skipped")
    store = RunStore.open(run_dir)
    try:
        attempt = store.query("SELECT status FROM results WHERE job_id = 'idle-dev2'")
        kept = store.query("SELECT kind FROM events WHERE job_id = 'idle-dev2' ORDER BY id")
    finally:
        store.close()
    assert attempt[0]["status"] == "incomplete"
    assert [r["kind"] for r in kept][:2] == ["hello", "job_start"]  # partial events kept
    # The launcher saw its session end and stopped the agent: nothing left on the device.
    assert wait_until(lambda: not processes_under(dev2), 15), processes_under(dev2)


def test_ctrl_c_leaves_no_agent_on_any_device(lab_factory, tmp_path: Path):  # noqa: F811
    lab = lab_factory(3)
    plan = write_plan(tmp_path / "plan.yaml", idle_s=120, jobs=PINNED_TO_DEV2)
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", "--devices", str(lab.inventory_path),
         "--plan", str(plan), "--out", str(tmp_path / "runs"), "--run-id", "interrupted"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    workdirs = [d.workdir for d in lab.devices]
    try:
        assert wait_until(
            lambda: all(len(processes_under(f"{w}/jobs/idle-")) >= 2 for w in workdirs), 60
        )
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    for workdir in workdirs:
        assert processes_under(workdir) == [], workdir
    statuses = job_statuses(tmp_path / "runs" / "interrupted")
    assert all(statuses[f"idle-dev{i}"] != "completed" for i in (1, 2, 3))


DIES_WITH_A_JOB = """
import json, sys
from harness.inventory import load_inventory
from harness.fleet.transport import SshTransport
sys.path.insert(0, {tests!r})
from fleet import idle_spec
transport = SshTransport(load_inventory({inventory!r}).device("dev1"))
transport.ensure_deployed({{}})
job = transport.start_job(idle_spec("orphan-check", 300))
for line in job.lines():
    print(json.loads(line)["kind"], flush=True)
"""


def test_killed_host_leaves_no_orphan(lab_factory):  # noqa: F811
    lab = lab_factory(1)
    workdir = lab.device("dev1").workdir
    script = DIES_WITH_A_JOB.format(tests=str(REPO_ROOT / "tests"),
                                    inventory=str(lab.inventory_path))
    host = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "hello"
        assert host.stdout.readline().strip() == "job_start"
        assert len(processes_under(workdir)) >= 2  # launcher + agent on the device
        host.kill()  # SIGKILL: no handler, no cleanup on the host side at all
        host.wait(10)
    finally:
        host.kill()
    assert wait_until(lambda: not processes_under(workdir), 15), processes_under(workdir)


def test_stop_ends_the_whole_process_group(lab_factory):  # noqa: F811
    lab = lab_factory(1)
    device = load_inventory(lab.inventory_path).device("dev1")
    with SshTransport(device) as transport:
        transport.ensure_deployed({})
        job = transport.start_job(idle_spec("stopped", 300))
        lines = job.lines()
        assert "job_start" in (json.loads(line)["kind"] for line in lines)  # handler set
        started = time.monotonic()
        job.stop(5.0)
        assert job.wait(10) == 130  # the agent's INTERRUPTED exit, after its SIGTERM handler
        assert time.monotonic() - started < 5
        assert [json.loads(line)["kind"] for line in lines][-1] == "interrupted"
    assert processes_under(device.workdir) == []


def test_lost_connection_raises_device_lost(lab_factory):  # noqa: F811
    lab = lab_factory(1)
    device = load_inventory(lab.inventory_path).device("dev1")
    with SshTransport(device) as transport:
        transport.ensure_deployed({})
        job = transport.start_job(idle_spec("lost", 300))
        lines = job.lines()
        next(lines)
        lab.kill_sshd("dev1")
        with pytest.raises(DeviceLost, match="connection lost"):
            list(lines)
        with pytest.raises(DeviceLost):
            transport.start_job(idle_spec("after-loss", 1))  # reconnecting fails: lost
    assert wait_until(lambda: not processes_under(device.workdir), 15)
