"""`harness run` on the local device with an emulated UM25C on a pty.

The emulator follows the CPU load of this test's process tree (which holds `harness run`
and its agent) through the Pi 4 profile and logs every value it displays. The store must
hold power samples throughout every job at the meter's rate, and the energy per job from
the store must be within 1 % of the integral of the emulator's own logged signal over the
same window (both integrated by `analysis.energy`).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.energy import MeterAccuracy, Window, window_energy
from harness.meters import um
from harness.meters.emulator import FaultPlan, LoadSignal, UmEmulator
from harness.meters.modeled import POWER_PROFILES
from harness.store import RunStore

REFRESH_HZ = 10.0  # the emulated display; polled at 4x so that no refresh is missed
PLAN = """\
idle_baseline_s: 4
cooldown_s: 1
max_attempts: 1
telemetry: {memory_hz: 5, power_hz: 5, step_every: 1}
datasets:
  digits: {}
matrix:
  - methods: [standard, lowmem]
    models: [mlp]
    datasets: [digits]
    batch_sizes: [100]
    seeds: [0]
    repeats: 1
    epochs: 3
"""


def read_signal(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return (
        np.array([float(row["t_host_s"]) for row in rows]),
        np.array([float(row["power_w"]) for row in rows]),
    )


def write_inputs(tmp_path: Path, link: Path, plan_text: str) -> tuple[Path, Path]:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "version: 1\n"
        "devices:\n"
        "  - name: local\n"
        "    transport: local\n"
        f"    meter: {{type: um25c, port: '{link}', poll_hz: {4 * REFRESH_HZ:g}, "
        f"refresh_hz: {REFRESH_HZ:g}}}\n"
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text)
    return inventory, plan


UM25C = MeterAccuracy(**um.ACCURACY["um25c"])


def harness_run(tmp_path: Path, inventory: Path, plan: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness", "run", "--devices", str(inventory),
         "--plan", str(plan), "--out", str(tmp_path / "runs"), "--run-id", "meter"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_run_records_an_emulated_um25c_and_energy_matches_its_signal(tmp_path):
    link = tmp_path / "rfcomm0"
    signal_log = tmp_path / "emulated-signal.csv"
    inventory, plan = write_inputs(tmp_path, link, PLAN)
    load = LoadSignal(POWER_PROFILES["pi4"], pid=os.getpid())
    with UmEmulator("um25c", load, refresh_hz=REFRESH_HZ, link=link, log_path=signal_log):
        result = harness_run(tmp_path, inventory, plan)
    assert result.returncode == 0, result.stderr[-3000:]

    store = RunStore.open(tmp_path / "runs" / "meter")
    try:
        jobs = store.query(
            "SELECT job_id, kind, status, t_start_host_s, t_end_host_s FROM jobs ORDER BY rowid"
        )
        rows = store.query(
            "SELECT t_host_s, power_w FROM power_samples WHERE device = 'local' "
            "AND meter = 'um25c' ORDER BY t_host_s"
        )
        gaps = store.query("SELECT * FROM meter_gaps")
        (stats,) = store.query("SELECT * FROM meter_stats")
    finally:
        store.close()
    t = np.array([row["t_host_s"] for row in rows])
    power = np.array([row["power_w"] for row in rows])
    t_signal, p_signal = read_signal(signal_log)

    assert len(jobs) == 3 and {job["status"] for job in jobs} == {"completed"}
    assert gaps == []
    assert stats["samples"] == len(rows) and stats["rejected_records"] == 0
    assert stats["achieved_hz"] == pytest.approx(REFRESH_HZ, rel=0.15)
    for job in jobs:
        window = Window(job["job_id"], job["t_start_host_s"], job["t_end_host_s"])
        measured = window_energy(t, power, window, accuracy=UM25C)
        emitted = window_energy(t_signal, p_signal, window, accuracy=UM25C)
        # power samples throughout the job, at the meter's rate
        assert measured.achieved_hz == pytest.approx(REFRESH_HZ, rel=0.15), job["job_id"]
        assert measured.largest_gap_s < 3 / REFRESH_HZ, job["job_id"]
        assert not measured.low_confidence, measured.reason
        print(
            f"{job['job_id']}: {measured.duration_s:.1f} s, {measured.samples} samples, "
            f"store {measured.energy_j:.2f} J vs emulator {emitted.energy_j:.2f} J "
            f"({100 * (measured.energy_j / emitted.energy_j - 1):+.2f} %)"
        )
        assert measured.energy_j == pytest.approx(emitted.energy_j, rel=0.01), job["job_id"]


@pytest.mark.slow
def test_run_survives_the_meter_unplugged_mid_run(tmp_path):
    """The pty goes away every 8 s for 1.5 s and comes back at the same path."""
    link = tmp_path / "rfcomm0"
    # The run must outlast two unplugs whatever the engine's speed: a 20 s idle baseline.
    one_job = (PLAN.replace("[standard, lowmem]", "[standard]").replace("epochs: 3", "epochs: 2")
               .replace("idle_baseline_s: 4", "idle_baseline_s: 20"))
    inventory, plan = write_inputs(tmp_path, link, one_job)
    load = LoadSignal(POWER_PROFILES["pi4"], pid=os.getpid())
    faults = FaultPlan(unplug_every_s=8.0, unplug_s=1.5)
    with UmEmulator("um25c", load, refresh_hz=REFRESH_HZ, link=link, faults=faults) as emulator:
        result = harness_run(tmp_path, inventory, plan)
        unplugs = emulator.injected["unplug"]
    assert result.returncode == 0, result.stderr[-3000:]
    store = RunStore.open(tmp_path / "runs" / "meter")
    try:
        statuses = {row["status"] for row in store.query("SELECT status FROM jobs")}
        t = np.array([row["t_host_s"] for row in store.query(
            "SELECT t_host_s FROM power_samples ORDER BY t_host_s")])  # fmt: skip
        gaps = store.query("SELECT t_start_s, t_end_s, reason FROM meter_gaps ORDER BY t_start_s")
        (stats,) = store.query("SELECT * FROM meter_stats")
    finally:
        store.close()
    assert statuses == {"completed"}
    assert unplugs >= 2
    # every unplug while the recorder ran is one gap (the last may fall after the run)
    assert unplugs - 1 <= len(gaps) <= unplugs
    assert stats["gaps"] == len(gaps)
    for gap in gaps:
        assert 1.4 < gap["t_end_s"] - gap["t_start_s"] < 4.0, gap["reason"]
        assert not np.any((t > gap["t_start_s"]) & (t < gap["t_end_s"]))
    # outside the gaps the samples keep the meter's rate: nothing after a gap is lost
    spacing = np.diff(t)
    inside_gap = np.zeros_like(spacing, dtype=bool)
    for gap in gaps:
        inside_gap |= (t[:-1] <= gap["t_start_s"] + 1e-6) & (t[1:] >= gap["t_end_s"] - 1e-6)
    assert spacing[~inside_gap].max() < 3 / REFRESH_HZ
