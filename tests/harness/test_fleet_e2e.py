"""End to end: `harness run` on 2 sshd devices: every arm of the comparison on each device.

Marked slow: four training jobs take about a minute on a shared 2-core machine (the
fault tests run `harness run` over SSH in the default suite with idle jobs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleet import harness, lab_factory, metered_lab, requires_sshd, write_plan  # noqa: F401

from harness.store import RunStore

TWO_ARMS = """\
  - methods: [standard, lowmem]
    models: [mlp]
    datasets: [digits]
    batch_sizes: [64]
    seeds: [0]
    epochs: 1
    max_steps: 1
"""


@pytest.mark.slow
@requires_sshd
def test_each_arm_runs_on_each_of_two_ssh_devices(metered_lab, tmp_path: Path):  # noqa: F811
    lab = metered_lab(2)  # each device with an emulated UM34C following its load
    plan = write_plan(tmp_path / "plan.yaml", idle_s=0, jobs=TWO_ARMS)
    result = harness("run", "--devices", str(lab.inventory_path), "--plan", str(plan),
                     "--out", str(tmp_path / "runs"), "--run-id", "e2e", timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "comparison per method" in output and "standard" in output and "lowmem" in output
    store = RunStore.open(tmp_path / "runs" / "e2e")
    try:
        jobs = store.query("SELECT job_id, status, device FROM jobs")
        events = store.query(
            "SELECT job_id, device, count(*) AS n, sum(kind = 'job_end') AS ends, "
            "sum(t_host_s IS NOT NULL) AS mapped FROM events GROUP BY job_id, device"
        )
        offsets = store.query(
            "SELECT device, job_id, phase, offset_s, rtt_s, error_s FROM clock_offsets"
        )
        devices = store.query("SELECT name, transport FROM devices")
        power = store.query("SELECT device, count(*) AS n FROM power_samples GROUP BY device")
        (row,) = store.query("SELECT value FROM run_info WHERE key = 'order'")
        order = json.loads(row["value"])
    finally:
        store.close()
    assert len(jobs) == 4 and all(j["status"] == "completed" for j in jobs)
    assert {d["name"]: d["transport"] for d in devices} == {f"dev{i}": "ssh" for i in (1, 2)}
    assert {p["device"] for p in power if p["n"] > 0} == {"dev1", "dev2"}
    ran = {(j["job_id"].rsplit("-on-", 1)[0], j["device"]) for j in jobs}
    assert ran == {(f"mlp-digits-{m}-b64-s0-r0", d) for m in ("standard", "lowmem")
                   for d in ("dev1", "dev2")}  # each arm on each device
    assert order["seed"] >= 0 and set(order["jobs"]) == {"dev1", "dev2"}
    assert len(events) == 4
    for row in events:
        assert row["n"] >= 4 and row["ends"] == 1 and row["mapped"] == row["n"]
    phases = {(o["job_id"], o["phase"]) for o in offsets}
    assert phases == {(j["job_id"], p) for j in jobs for p in ("before", "after")}
    for o in offsets:
        assert abs(o["offset_s"]) < 0.05 and o["error_s"] == o["rtt_s"] / 2 and o["rtt_s"] > 0
