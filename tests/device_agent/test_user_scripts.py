"""Bring your own training script: a plan's `scripts:` run by the agent on an sshd device
like a built-in job, with `device_agent.window` / `begin_window` / `end_window` recorded as
windows with their own energy (from the device's emulated meter), read back through
`harness.api`, `energy.csv` (phase `window`) and `harness export`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from fleet import harness, lab_factory, metered_lab, requires_sshd  # noqa: F401

import device_agent
from harness import api
from harness.errors import HarnessUsageError
from harness.plan import load_plan

SCRIPT = textwrap.dedent('''\
    """A user's own training loop (no harness code but the windows)."""
    import sys
    import time

    import device_agent

    assert sys.argv[1:] == ["--rounds", "2", "a b"], sys.argv
    print("hello from the user's script")   # must not corrupt the agent's event stream
    with device_agent.window("busy"):
        deadline = time.monotonic() + 2.0
        x = 0
        while time.monotonic() < deadline:
            x += sum(i * i for i in range(2000))
    device_agent.begin_window("rest")
    time.sleep(2.0)
    record = device_agent.end_window("rest")
    assert record.name == "rest" and 1.9 < record.elapsed_s < 5, record
    with device_agent.window("busy"):           # the same name again: a second window
        time.sleep(0.3)
    ''')


def write_plan(tmp_path: Path) -> Path:
    (tmp_path / "my_train.py").write_text(SCRIPT)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "idle_baseline_s: 2\ncooldown_s: 0\nmax_attempts: 1\n"
        "telemetry: {memory_hz: 5, power_hz: 1, step_every: 1}\n"
        "scripts:\n  - name: mine\n    path: my_train.py\n"
        "    args: [--rounds, 2, 'a b']\n"
    )
    return plan


@requires_sshd
def test_a_user_script_runs_on_a_device_with_windows_and_their_energy(
    metered_lab, tmp_path: Path  # noqa: F811
):
    lab = metered_lab(1)
    plan = write_plan(tmp_path)
    result = harness("run", "--devices", str(lab.inventory_path), "--plan", str(plan),
                     "--out", str(tmp_path / "runs"), "--run-id", "own", timeout=400)
    run_dir = tmp_path / "runs" / "own"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = api.load(run_dir)
    jobs = run.run.jobs.set_index("job_id")
    assert jobs.loc["script-mine-r0", "status"] == "completed"
    events = run.run.events
    mine = events[events["job_id"] == "script-mine-r0"]
    assert mine["malformed_reason"].isna().all()  # the script's print went to stderr
    assert {"job_start", "memory", "window_start", "window_end", "job_end"} <= set(mine["kind"])
    events_file = Path(lab.devices[0].workdir) / "jobs" / "script-mine-r0" / "events.jsonl"
    assert "hello from" not in events_file.read_text()
    assert (run_dir / "scripts" / "script-mine.py").read_text() == SCRIPT  # the run's copy

    windows = run.windows()
    assert list(windows["window"]) == ["busy", "rest", "busy"]
    assert list(windows["index"]) == [0, 1, 2]
    busy, rest = windows.iloc[0], windows.iloc[1]
    assert 1.8 < busy["duration_s"] < 6 and 1.8 < rest["duration_s"] < 6
    # each window's energy from the device's meter, with its interval; work costs more
    assert set(windows["meter"]) == {"um34c"}
    assert (windows["energy_lo_j"] <= windows["energy_j"]).all()
    assert busy["energy_j"] / busy["duration_s"] > rest["energy_j"] / rest["duration_s"]
    assert busy["energy_kwh"] == pytest.approx(busy["energy_j"] / 3.6e6)
    assert api.energy_per_window(run_dir)["energy_j"].tolist() == windows["energy_j"].tolist()
    # ... the same rows in harness export's energy.csv (phase window, named)
    export = harness("export", str(run_dir), "--format", "csv", timeout=300)
    assert export.returncode == 0, export.stderr
    energy = pd.read_csv(run_dir / "export" / "energy.csv")
    rows = energy[energy["phase"] == "window"]
    assert rows["window"].tolist() == ["busy", "rest", "busy"]
    assert rows["energy_j"].tolist() == pytest.approx(windows["energy_j"].tolist())
    assert "windows" in run.tables() and len(run.tables()["memory"]) > 0


def test_windows_outside_the_agent_time_and_refuse_misuse():
    with device_agent.window("alone"):
        pass
    device_agent.begin_window("outer")
    device_agent.begin_window("inner")  # nesting, by name
    assert device_agent.end_window("inner").name == "inner"
    record = device_agent.end_window("outer")
    assert record.elapsed_s >= 0 and record.t_end_wall_s >= record.t_start_wall_s
    with pytest.raises(ValueError, match="is not open"):
        device_agent.end_window("never")
    device_agent.begin_window("twice")
    with pytest.raises(ValueError, match="already open"):
        device_agent.begin_window("twice")
    device_agent.end_window("twice")
    with pytest.raises(ValueError, match="window name"):
        device_agent.begin_window("bad\nname")


def test_plan_scripts_errors_name_file_line_and_field(tmp_path: Path):
    plan = tmp_path / "plan.yaml"
    cases = {
        "scripts:\n  - name: a\n    path: nope.py\n": r":3: field 'scripts\[0\].path': no such",
        "scripts:\n  - name: a b\n    path: x.py\n": r":2: field 'scripts\[0\].name': expected",
        "scripts:\n  - name: a\n    path: x.py\n    colour: red\n":
            r":4: field 'scripts\[0\].colour': unknown key",
        "scripts:\n  - name: a\n    path: x.py\n    args: {a: 1}\n":
            r":4: field 'scripts\[0\].args': expected a list",
    }
    (tmp_path / "x.py").write_text("pass\n")
    for text, pattern in cases.items():
        plan.write_text(text)
        with pytest.raises(HarnessUsageError, match=pattern):
            load_plan(plan)
    plan.write_text("scripts:\n  - name: a\n    path: x.py\n    args: '--lr 0.1'\n"
                    "    repeats: 2\n    devices: [pi5]\n")
    jobs = load_plan(plan).jobs
    assert [j.job_id for j in jobs] == ["script-a-r0", "script-a-r1"]
    assert jobs[0].spec["script"]["args"] == ["--lr", "0.1"] and jobs[0].pinned == ("pi5",)
    assert json.loads(json.dumps(jobs[0].spec))["method"]["name"] == "script"


def test_failing_scripts_are_recorded_and_the_others_go_on(tmp_path: Path):
    """On the local device (modeled power): a script that raises and one that exits 3 fail
    with their reason; the good one completes with its window, labelled modeled."""
    (tmp_path / "good.py").write_text(
        "import device_agent\nwith device_agent.window('work'):\n    sum(range(10**6))\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('the user script broke')\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "idle_baseline_s: 0\ncooldown_s: 0\nmax_attempts: 1\n"
        "scripts:\n  - {name: good, path: good.py}\n  - {name: raises, path: raises.py}\n"
        "  - {name: exits, path: exits.py}\n")
    result = harness("run", "--plan", str(plan), "--out", str(tmp_path / "runs"),
                     "--run-id", "faults", timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]  # some jobs failed, others kept
    run = api.load(tmp_path / "runs" / "faults")
    jobs = run.run.jobs.set_index("job_id")
    assert jobs.loc["script-good-r0", "status"] == "completed"
    assert jobs.loc["script-raises-r0", "status"] == "failed"
    assert "RuntimeError: the user script broke" in jobs.loc["script-raises-r0", "reason"]
    assert "exited with status 3" in jobs.loc["script-exits-r0", "reason"]
    windows = run.windows()
    assert list(windows["window"]) == ["work"] and set(windows["meter_kind"]) == {"modeled"}
