"""The cooldown to idle temperature, on a real sshd device whose thermal zone is emulated.

The lab device sees its own /sys/class/thermal/thermal_zone0/temp (a bind mount in its
private mount namespace); `harness.thermal` writes it from a first-order model driven by
the CPU load of the device's sshd tree. The agent reads it through its ordinary path: the
board sampler during the idle baseline gives the idle temperature, and before each job
(in setup) the agent waits until the board is back within 2 °C of it, or gives up after
the plan's `telemetry.cool_max_s`.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
from fleet import harness, lab_factory, requires_root, requires_sshd, thermal_lab  # noqa: F401

from analysis.conditions import job_conditions
from analysis.load import load_run
from harness.thermal import ThermalModel

# A small board under a heatsink: warms by up to 60 °C at full load, time constant 8 s
# (short, so that the test's waits are seconds, not minutes).
MODEL = ThermalModel(idle_c=45.0, rise_c=60.0, tau_s=8.0)


def plan_text(cool_max_s: float | None) -> str:
    telemetry = "{memory_hz: 2, power_hz: 1, step_every: 1"
    telemetry += f", cool_max_s: {cool_max_s:g}}}" if cool_max_s is not None else "}"
    return (
        "idle_baseline_s: 3\ncooldown_s: 1\nmax_attempts: 1\n"
        f"telemetry: {telemetry}\n"
        "datasets:\n  digits: {}\nmatrix:\n"
        "  - methods: [standard]\n    models: [mlp]\n    datasets: [digits]\n"
        "    batch_sizes: [64]\n    seeds: [0]\n    repeats: 2\n    epochs: 1\n"
        "    max_steps: 20\n"
    )


def run_plan(lab, tmp_path: Path, cool_max_s: float | None):
    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text(cool_max_s))
    result = harness("run", "--devices", str(lab.inventory_path), "--plan", str(plan),
                     "--out", str(tmp_path / "runs"), "--run-id", "thermal", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = job_conditions(load_run(tmp_path / "runs" / "thermal"))
    jobs = jobs[jobs["kind"] != "idle"]
    print(jobs[["job_id", "cooldown_from_c", "cooldown_to_c", "cooldown_at_c", "cooldown_wait_s",
                "cooldown_reached", "temp_c_max"]].to_string())
    return result, jobs


def test_the_model_warms_under_load_and_decays_exponentially_to_idle():
    model = ThermalModel(idle_c=40.0, rise_c=30.0, tau_s=10.0)
    hot = model.step(40.0, 1.0, 10.0)
    assert hot == pytest.approx(40.0 + 30.0 * (1 - math.exp(-1)))
    assert model.step(hot, 0.0, 10.0) - 40.0 == pytest.approx((hot - 40.0) / math.e)
    steps = 70.0  # exact per step: a hundred small steps give the same curve as one
    for _ in range(100):
        steps = model.step(steps, 0.0, 0.1)
    assert steps == pytest.approx(model.step(70.0, 0.0, 10.0))
    assert model.step(50.0, 7.0, 1e6) == pytest.approx(70.0)  # load clipped to 1


@requires_sshd
@requires_root
def test_job_waits_for_the_idle_temperature_and_records_the_wait(thermal_lab, tmp_path):  # noqa: F811
    lab = thermal_lab(1, MODEL)
    device = lab.devices[0]
    # the zone is the device's own: it reads the emulated file, this machine does not
    inside = subprocess.run(
        ["ssh", "-i", str(lab.user_key), "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={lab.known_hosts_path}",
         "-p", str(device.port), device.host, "cat /sys/class/thermal/thermal_zone0/type"],
        capture_output=True, text=True, timeout=60)
    assert inside.stdout.strip() == "cpu-thermal", inside.stderr
    assert not Path("/sys/class/thermal/thermal_zone0/type").exists() or (
        Path("/sys/class/thermal/thermal_zone0/type").read_text() != "cpu-thermal\n")

    _, jobs = run_plan(lab, tmp_path, cool_max_s=None)
    assert len(jobs) == 2 and set(jobs["status"]) == {"completed"}
    # the target is the idle baseline's temperature (as read on the device) plus 2 °C
    assert (jobs["cooldown_to_c"] > MODEL.idle_c + 2 - 0.5).all()
    assert (jobs["cooldown_to_c"] < MODEL.idle_c + 2 + 10).all()
    assert jobs["cooldown_reached"].tolist() == [True, True]
    assert (jobs["cooldown_at_c"] <= jobs["cooldown_to_c"]).all()
    # the agent's own start-up (torch, the engine) warmed the board: it waited, and says so
    warm = jobs[jobs["cooldown_from_c"] > jobs["cooldown_to_c"]]
    assert len(warm) >= 1, jobs[["cooldown_from_c", "cooldown_to_c"]]
    assert (warm["cooldown_wait_s"] > 0).all()


@requires_sshd
@requires_root
def test_job_gives_up_after_the_configured_maximum_with_a_clear_mark(thermal_lab, tmp_path):  # noqa: F811
    lab = thermal_lab(1, MODEL)
    result, jobs = run_plan(lab, tmp_path, cool_max_s=1)
    gave_up = jobs[jobs["cooldown_reached"] == False]  # noqa: E712 (a pandas column)
    assert len(gave_up) >= 1, jobs[["cooldown_from_c", "cooldown_to_c", "cooldown_at_c"]]
    assert (gave_up["cooldown_wait_s"] == 1.0).all()
    assert (gave_up["cooldown_at_c"] > gave_up["cooldown_to_c"]).all()
    assert "not cooled to" in result.stdout + result.stderr
