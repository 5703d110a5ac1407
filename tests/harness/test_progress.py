"""Progress that says what is happening: the agent's setup stages (checking data, loading
engine or building kernels, loading data, building model) reach the runner's per-device
progress, and `harness run` draws a rich bar per device with elapsed time and time left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fleet import digits_file, training_spec  # noqa: F401
from rich.console import Console

from contract.events import Event, parse_event_line
from harness.clock import ClockEstimate
from harness.progress import FleetProgress, describe, job_fraction
from harness.recorder import Progress, StreamRecorder
from harness.store import PlannedJob, RunStore

REPO = Path(__file__).resolve().parents[2]


def test_a_real_agent_says_its_setup_stages_before_training(tmp_path: Path, digits_file):  # noqa: F811
    spec = training_spec("stages", digits_file, max_steps=2)
    (tmp_path / "job.json").write_text(spec.to_json())
    result = subprocess.run(
        [sys.executable, "-m", "device_agent", "run", "job.json", "--out", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    events = [parse_event_line(line) for line in result.stdout.splitlines()]
    assert all(isinstance(e, Event) for e in events)
    kinds = [e.kind for e in events]
    stages = [e.data["stage"] for e in events if e.kind == "setup"]
    assert stages[0] == "checking data"
    assert stages[1] in ("loading engine", "building kernels")
    assert stages[2:] == ["loading data", "building model"]
    assert kinds.index("setup") < kinds.index("job_start") < kinds.index("epoch_start")
    model = next(e for e in events if e.kind == "setup" and e.data["stage"] == "building model")
    assert model.data["steps_per_epoch"] == 1437 // 32  # digits' training split, batch 32


def recorder_for(tmp_path: Path, logged: list[str]) -> tuple[StreamRecorder, Progress]:
    store = RunStore.create(tmp_path / "run").start()
    job = PlannedJob("j1", 0, "train", "standard", "mlp", "digits", 32, 2, None, 0, 0, (), {})
    store.add_jobs([job])
    progress = Progress("pi-a", job_id="j1", epochs=2)
    clock = ClockEstimate(offset_s=0.0, rtt_s=0.001, error_s=0.0005, t_host_s=0.0, samples=1)
    return StreamRecorder(store, "pi-a", job, 1, clock, progress, log=logged.append), progress


SPEC = {"schema_version": 1, "job_id": "j1", "method": {"name": "standard"}, "model": "mlp",
        "dataset": {"name": "digits", "path": "data/digits.npz", "sha256": "ab" * 32}}


def line(kind: str, seq: int, **data) -> str:
    return json.dumps({"v": 1, "kind": kind, "job_id": "j1", "seq": seq, "t_mono_ns": seq,
                       "t_wall_s": 1000.0 + seq, "data": data})


def test_setup_stages_reach_the_devices_progress_and_the_log(tmp_path: Path):
    logged: list[str] = []
    recorder, progress = recorder_for(tmp_path, logged)
    recorder.line(0, line("setup", 0, stage="building kernels"))
    assert progress.state == "setup: building kernels"
    assert logged == ["[pi-a] j1: building kernels ..."]  # said once, for logs without a tty
    since = progress.state_since_s
    assert describe(progress, now=since + 41).endswith("building kernels 0:00:41")
    recorder.line(1, line("job_start", 1, spec=SPEC, rss_start_bytes=1 << 20, hwm_reset=True))
    recorder.line(2, line("setup", 2, stage="loading data"))
    recorder.line(3, line("setup", 3, stage="building model", steps_per_epoch=44))
    assert progress.state == "setup: building model" and progress.steps_per_epoch == 44
    recorder.line(4, line("epoch_start", 4, epoch=1))
    recorder.line(5, line("step", 5, global_step=11, epoch=1, step=11, loss=1.5,
                          step_time_s=0.01))
    assert progress.state == "running"
    assert describe(progress) == "epoch 1/2 loss 1.500"
    assert job_fraction(progress) == (11.0, 88.0)
    assert len(logged) == 1
    recorder.store.close()


def test_fleet_progress_draws_a_bar_per_device_with_time_left():
    clock = [100.0]
    a = Progress("pi-a", job_id="j1", state="running", epoch=1, step=0, epochs=2,
                 steps_per_epoch=50, jobs_total=3, done=1)
    b = Progress("pi-b", jobs_total=2)
    b.set_state("setup: building kernels", now=100.0)
    console = Console(record=True, width=200, force_terminal=False)
    fleet = FleetProgress([a, b], console=console, get_time=lambda: clock[0])
    for step in (10, 20, 30, 40, 50):  # 10 steps every 2 s: 50 of 100 done, 10 s left
        clock[0] += 2.0
        a.step = step
        fleet.update(now=clock[0])
    console.print(fleet.progress)
    text = console.export_text()
    row_a = next(r for r in text.splitlines() if r.startswith("pi-a"))
    row_b = next(r for r in text.splitlines() if r.startswith("pi-b"))
    assert "1/3 jobs" in row_a and "j1" in row_a and "50%" in row_a
    assert "0:00:10" in row_a  # time left at the job's own pace
    assert "epoch 1/2" in row_a
    assert "0/2 jobs" in row_b and "setup: building kernels 0:00:10" in row_b
