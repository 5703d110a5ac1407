"""`harness run` end to end on this machine: the embedded default, and jobs that fail."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
from fleet import wait_until
from runs import table_ready

from contract.events import MAX_EVENT_LINE_BYTES, EpochEnd, Event, JobEnd, JobStart, Memory
from contract.jobspec import JobSpec
from harness.clock import ClockEstimate
from harness.commands.export import export_run
from harness.exit_codes import ExitStatus
from harness.recorder import Progress, StreamRecorder
from harness.runner import classify
from harness.store import PlannedJob, RunStore

REPO = Path(__file__).resolve().parents[2]


def harness(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def only_run_dir(root: Path) -> Path:
    runs = [p for p in (root / "runs").iterdir() if not p.is_symlink()]
    assert len(runs) == 1, runs
    assert (root / "runs" / "latest").resolve() == runs[0].resolve()  # maintained by `run`
    return runs[0]


def test_default_run_completes_every_job_with_samples_and_manifest(tmp_path):
    proc = harness("run", cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=600)
    run_dir = only_run_dir(tmp_path)
    db = sqlite3.connect(f"{(run_dir / 'run.sqlite').as_uri()}?mode=ro", uri=True)
    outcomes = db.execute("SELECT job_id, status, exit_code, reason FROM jobs").fetchall()
    assert proc.returncode == ExitStatus.OK, (outcomes, stderr[-2000:])
    assert f"run directory: runs/{run_dir.name}" in stdout
    for header in ("peak RSS+ MiB", "s / epoch", "J / epoch [95 %]", "test accuracy"):
        assert header in stdout
    assert "] modeled" in stdout  # each modeled figure says so, beside its interval
    # and its meter's accuracy class is an assumption, with the reason
    assert "modeled (class assumed)" in stdout
    assert "modeled: its accuracy class (in every interval above) is assumed ±25 %" in stdout
    # every energy figure of the embedded default run is confident (issue 15 point 8)
    assert " ok, 0 low-confidence, 0 withheld" in stdout, stdout[-3000:]
    jobs = db.execute("SELECT job_id, kind, status, attempts FROM jobs").fetchall()
    assert {j[0] for j in jobs} == {
        "idle-local",
        "mlp-digits-standard-b20-s0-r0",
        "mlp-digits-lowmem-b20-s0-r0",
    }
    assert all(status == "completed" and attempts == 1 for _, _, status, attempts in jobs)
    results = dict(db.execute("SELECT job_id, test_accuracy FROM results WHERE method != 'idle'"))
    assert all(0.3 < acc <= 1.0 for acc in results.values()), results  # chance is 0.1
    peaks = dict(db.execute("SELECT method, peak_tensor_bytes FROM results WHERE method != 'idle'"))
    assert 0 < peaks["lowmem"] < peaks["standard"], peaks  # from the first steps' ledger
    for job_id, _, _, _ in jobs:
        rows = db.execute(
            "SELECT seq, t_host_s FROM memory_samples WHERE job_id = ? ORDER BY seq", (job_id,)
        ).fetchall()
        assert len(rows) >= 3, job_id
        times = [t for _, t in rows]
        assert times == sorted(times), job_id
    power = db.execute(
        "SELECT t_host_s, power_w FROM power_samples WHERE meter = 'modeled' ORDER BY id"
    ).fetchall()
    assert len(power) > 20 and all(w > 0 for _, w in power)
    assert [t for t, _ in power] == sorted(t for t, _ in power)
    idle_start, idle_end = db.execute(
        "SELECT t_start_host_s, t_end_host_s FROM phases WHERE kind = 'idle'"
    ).fetchone()
    assert 4.5 < idle_end - idle_start < 30
    in_idle = db.execute(
        "SELECT COUNT(*) FROM power_samples WHERE t_host_s BETWEEN ? AND ?", (idle_start, idle_end)
    ).fetchone()[0]
    assert in_idle >= 10
    first_train = db.execute("SELECT MIN(t_start_host_s) FROM phases WHERE kind = 'job'")
    assert first_train.fetchone()[0] > idle_end  # the baseline came before the jobs
    assert db.execute("SELECT COUNT(*) FROM phases WHERE kind = 'epoch'").fetchone()[0] == 10
    offsets = db.execute("SELECT phase, error_s FROM clock_offsets").fetchall()
    assert sorted({p for p, _ in offsets}) == ["after", "before"]
    assert all(0 <= e < 0.1 for _, e in offsets)
    facts = json.loads(db.execute("SELECT facts_json FROM devices").fetchone()[0])
    assert facts["cpu_cores"] == os.cpu_count()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("run_id", "plan", "inventory", "versions", "git", "datasets", "power"):
        assert manifest[key] is not None, key
    assert manifest["run_id"] == run_dir.name
    assert manifest["plan"]["jobs"] == [
        "mlp-digits-standard-b20-s0-r0",
        "mlp-digits-lowmem-b20-s0-r0",
    ]
    assert manifest["inventory"]["devices"][0]["name"] == "local"
    assert len(manifest["git"]["commit"]) == 40
    assert len(manifest["datasets"][0]["sha256"]) == 64
    assert manifest["versions"]["python"] and manifest["power"]["recorded"] is True
    for fmt in ("csv", "parquet"):
        written = {p.stem: p for p in export_run(run_dir, fmt, tmp_path / fmt)}
        frame = (
            pd.read_csv(written["power_samples"])
            if fmt == "csv"
            else pd.read_parquet(written["power_samples"])
        )
        assert len(frame) == db.execute("SELECT COUNT(*) FROM power_samples").fetchone()[0]
        assert {"t_host_s", "power_w", "meter"} <= set(frame.columns)
        assert set(written) >= {"jobs", "events", "memory_samples", "results", "phases"}


FAULT_PLAN = """\
idle_baseline_s: 0
cooldown_s: 0
max_attempts: 1
datasets: {digits: {}}
matrix:
  - methods: [{name: bop, label: raises, momentum_format: "4,3"}]  # tau: refused on the device
    models: [mlp]
    datasets: [digits]
    epochs: 1
  - methods: [{name: standard, label: sigterm}]
    models: [mlp]
    datasets: [digits]
    epochs: 500
  - methods: [{name: standard, label: oom}]
    models: [binarynet]
    datasets: [digits]
    batch_sizes: [1000]
    epochs: 1
    limits: {extra_address_space_bytes: 200000000}
  - methods: [{name: lowmem, label: good}]
    models: [mlp]
    datasets: [digits]
    epochs: 1
    max_steps: 3
"""


def test_failing_jobs_are_recorded_and_the_run_goes_on(tmp_path):
    (tmp_path / "plan.yaml").write_text(FAULT_PLAN)
    proc = harness("run", "--plan", "plan.yaml", "--run-id", "faults", cwd=tmp_path)
    db_path = tmp_path / "runs" / "faults" / "run.sqlite"
    deadline = time.monotonic() + 300
    target = "mlp-digits-sigterm-b100-s0-r0"
    pid = None
    while pid is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if not db_path.exists():
            continue
        if not table_ready(db_path):
            continue
        db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
        hello = db.execute(
            "SELECT raw_json FROM events WHERE job_id = ? AND kind = 'hello'", (target,)
        ).fetchone()
        stepped = db.execute(
            "SELECT 1 FROM events WHERE job_id = ? AND kind = 'step'", (target,)
        ).fetchone()
        if hello and stepped:
            pid = json.loads(hello[0])["data"]["pid"]
        db.close()
    assert pid is not None, "the long job never started"
    os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == ExitStatus.PARTIAL, stderr[-3000:]
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    status = dict(db.execute("SELECT job_id, status FROM jobs"))
    assert status == {
        "mlp-digits-raises-b100-s0-r0": "failed",
        target: "interrupted",
        "binarynet-digits-oom-b1000-s0-r0": "oom",
        "mlp-digits-good-b100-s0-r0": "completed",
    }
    last = {
        job_id: json.loads(raw)
        for job_id, raw in db.execute(
            "SELECT job_id, raw_json FROM events e WHERE seq = (SELECT MAX(seq) FROM events "
            "WHERE job_id = e.job_id AND malformed_reason IS NULL)"
        )
    }
    assert last["mlp-digits-raises-b100-s0-r0"]["kind"] == "error"
    assert "momentum" in last["mlp-digits-raises-b100-s0-r0"]["data"]["message"]
    assert last[target]["kind"] == "interrupted"
    assert last[target]["data"]["reason"] == "SIGTERM"
    oom = last["binarynet-digits-oom-b1000-s0-r0"]
    assert oom["kind"] == "error" and oom["data"]["oom"] is True
    exit_codes = dict(db.execute("SELECT job_id, exit_code FROM jobs"))
    assert exit_codes["mlp-digits-raises-b100-s0-r0"] == 1
    assert exit_codes["binarynet-digits-oom-b1000-s0-r0"] == 3
    assert exit_codes[target] == 130
    assert "run directory: runs/faults" in stdout


def test_malformed_event_lines_are_recorded_and_never_crash(tmp_path):
    store = RunStore.create(tmp_path / "r").start()
    job = PlannedJob("j", 0, "train", "standard", "mlp", "digits", 100, 1, None, 0, 0, (), {})
    recorder = StreamRecorder(
        store, "dev", job, 1, ClockEstimate(0.0, 2.0, 0.01, 0.005, 8), Progress("dev")
    )
    good = Event.of(Memory(rss_bytes=10, hwm_bytes=12, vm_bytes=None), "j", 0, 5, 100.0).to_line()
    lines = [
        good,
        good[:-9],  # truncated
        '{"v": 7, "kind": "step", "job_id": "j", "seq": 1, "t_mono_ns": 1, "t_wall_s": 1}',
        '{"v": 1, "kind": "step", "job_id": "j", "seq": "one", "t_mono_ns": 1, "t_wall_s": 1}',
        "x" * (MAX_EVENT_LINE_BYTES + 1),
        Event("gpu_clock", "j", 2, 6, 101.0, {"mhz": 1}).to_line(),  # unknown kind: kept, skipped
        Event("epoch_start", "j", 3, 7, 102.0, {"epoch": "one"}).to_line(),  # wrong type inside
        Event.of(JobEnd(epochs=1, steps=3, seconds_total=1.0, test_accuracy=0.5), "j", 4, 8,
                 103.0).to_line(),
    ]
    for line_no, line in enumerate(lines):
        recorder.line(line_no, line)
    store.close()
    db = sqlite3.connect(tmp_path / "r" / "run.sqlite")
    rows = db.execute(
        "SELECT line_no, kind, malformed_reason, t_host_s, length(raw_json) "
        "FROM events ORDER BY line_no"
    ).fetchall()
    assert [r[0] for r in rows] == list(range(len(lines)))
    malformed = {r[0]: r[2] for r in rows if r[2]}
    assert set(malformed) == {1, 2, 3, 4, 6}
    assert "not JSON" in malformed[1] and "'v'" in malformed[2] and "'seq'" in malformed[3]
    assert "'epoch_start.epoch'" in malformed[6]  # the contract checks each kind's fields
    assert "too long" in malformed[4] and rows[4][4] <= 1000
    assert rows[0][3] == 98.0  # device time mapped through the offset
    assert db.execute("SELECT rss_bytes, t_host_s FROM memory_samples").fetchall() == [(10, 98.0)]
    assert recorder.malformed == 5 and recorder.last_kind == "job_end"


def test_setup_is_its_own_phase_never_inside_the_jobs(tmp_path):
    """Agent start-up, engine, kernel and data loading run before the first epoch: the
    `setup` window; the `job` window is the work, first epoch_start to job_end."""
    store = RunStore.create(tmp_path / "r").start()
    job = PlannedJob("j", 0, "train", "standard", "mlp", "digits", 100, 2, None, 0, 0, (), {})
    clock = ClockEstimate(0.0, 0.0, 0.002, 0.001, 8)
    recorder = StreamRecorder(store, "dev", job, 1, clock, Progress("dev"), t_attempt_host_s=90.0)
    spec = JobSpec.from_dict({"schema_version": 1, "job_id": "idle-dev", "model": None,
                              "method": {"name": "idle", "duration_s": 5}, "dataset": None})
    start = JobStart(spec=spec, rss_start_bytes=None, hwm_reset=False).to_data()
    end = JobEnd(epochs=2, steps=20, seconds_total=51.0).to_data()

    def epoch_end(epoch: int) -> dict:
        return EpochEnd(epoch=epoch, steps=10, train_loss=0.5, test_loss=0.5,
                        test_accuracy=0.5, seconds=10.0).to_data()

    events = [
        Event("job_start", "j", 0, 1, 100.0, start), Event("epoch_start", "j", 1, 2, 130.0,
                                                           {"epoch": 1}),
        Event("epoch_end", "j", 2, 3, 140.0, epoch_end(1)),
        Event("epoch_start", "j", 3, 4, 140.5, {"epoch": 2}),
        Event("epoch_end", "j", 4, 5, 150.0, epoch_end(2)),
        Event("job_end", "j", 5, 6, 151.0, end),
    ]
    for line_no, event in enumerate(events):
        recorder.line(line_no, event.to_line())
    idle_job = PlannedJob("idle-dev", -1, "idle", "idle", None, None, None, None, None, None,
                          None, ("dev",), {})
    idle = StreamRecorder(store, "dev", idle_job, 1, clock, Progress("dev"), t_attempt_host_s=1.0)
    for line_no, event in enumerate([Event("job_start", "idle-dev", 0, 1, 3.0, start),
                                     Event("job_end", "idle-dev", 1, 2, 8.0, end)]):
        idle.line(line_no, event.to_line())
    store.close()
    db = sqlite3.connect(tmp_path / "r" / "run.sqlite")
    phases = db.execute("SELECT job_id, kind, idx, t_start_host_s, t_end_host_s FROM phases "
                        "ORDER BY t_start_host_s, kind").fetchall()
    assert phases == [("idle-dev", "setup", 0, 1.0, 3.0), ("idle-dev", "idle", 0, 3.0, 8.0),
                      ("j", "setup", 0, 90.0, 130.0), ("j", "epoch", 1, 130.0, 140.0),
                      ("j", "job", 0, 130.0, 151.0), ("j", "epoch", 2, 140.5, 150.0)]


def test_bad_command_line_input_is_one_line_exit_2_and_creates_no_run(tmp_path):
    (tmp_path / "bad-plan.yaml").write_text("matrix:\n  - methods: [standard]\n    models: [mlp]\n")
    cases = [
        (("run", "--run-id", "a b;c"), "--run-id"),
        (("run", "--devices", "missing.yaml"), "missing.yaml: cannot read"),
        (("run", "--plan", "bad-plan.yaml"), "bad-plan.yaml:2: field 'matrix[0].datasets'"),
        (("run", "--resume", "runs/none"), "runs/none: no run.sqlite"),
        (("data", "prepare", "imagenet"), "unknown data set 'imagenet'"),
        (("export", "runs/none"), "runs/none: no run.sqlite"),
    ]
    for args, message in cases:
        proc = harness(*args, cwd=tmp_path)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == ExitStatus.USAGE, (args, stderr)
        assert message in stderr and stderr.strip().count("\n") == 0, (args, stderr)
    assert not (tmp_path / "runs").exists()


def test_outcome_classification_tells_crash_oom_kill_and_interrupt_apart():
    assert classify(0, "job_end", False) == ("completed", "ok")
    assert classify(1, "error", False)[0] == "failed"
    assert classify(2, "error", False) == ("failed", "the agent refused the job spec")
    assert classify(3, "error", False)[0] == "oom"
    assert classify(130, "interrupted", False)[0] == "interrupted"
    assert classify(-signal.SIGKILL, None, False) == (
        "oom",
        "killed by SIGKILL (likely the out-of-memory killer)",
    )
    assert classify(-signal.SIGSEGV, None, False) == ("failed", "killed by signal SIGSEGV")
    assert classify(-signal.SIGKILL, None, True)[0] == "interrupted"  # we stopped it
    assert classify(0, None, False)[0] == "lost"  # stream ended without job_end
    assert classify(None, None, False)[0] == "lost"


def test_stop_reaches_an_agent_started_while_the_runner_was_stopping(tmp_path: Path):
    """Ctrl-C between a worker's `start_job` and its registering the agent: still stopped."""
    from harness.inventory import Device
    from harness.local import LocalTransport
    from harness.plan import idle_job
    from harness.recorder import Recorder
    from harness.runner import Runner

    started, stopping = threading.Event(), threading.Event()

    class SlowToRegister(LocalTransport):
        def start_job(self, job_spec):
            job = super().start_job(job_spec)
            started.set()
            stopping.wait(30)  # hand the agent back only once Runner.stop() has looked
            return job

    device = Device(name="solo", transport="local", host=None)
    store = RunStore.create(tmp_path / "run").start()
    job = idle_job("solo", 120, {})
    store.add_device(device.name, device.transport, device.host, device.tags, device.meter)
    store.add_jobs([job])
    runner = Runner(
        Recorder(store), [device], [job], {}, max_attempts=1, cooldown_s=0, attempts={},
        log=lambda _: None,
        transport_factory=lambda d: SlowToRegister(d, root=tmp_path / "device"),
    )
    runner.start()
    assert started.wait(60)
    stopper = threading.Thread(target=runner.stop)
    began = time.monotonic()
    stopper.start()
    assert wait_until(lambda: runner.stopping, 10, step_s=0.01)
    stopping.set()
    stopper.join(60)
    assert time.monotonic() - began < 12, "the worker ran its job on instead of stopping it"
    assert not runner.alive()
    status = store.query("SELECT status FROM jobs WHERE job_id = 'idle-solo'")[0]["status"]
    store.close()
    assert status != "completed"

