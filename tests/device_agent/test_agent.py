"""The device agent as a subprocess: event stream, result files, signals, faults, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.events import AgentExit, Event, parse_event_line
from device_agent.sampler import parse_pmic_adc

REPO = Path(__file__).resolve().parents[2]


def agent(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "device_agent", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def write_spec(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return str(path)


def idle_spec(duration_s: float, memory_hz: float = 20) -> dict:
    return {
        "schema_version": 1,
        "job_id": "idle-test",
        "method": {"name": "idle", "duration_s": duration_s},
        "model": None,
        "dataset": None,
        "epochs": None,
        "telemetry": {"memory_hz": memory_hz},
    }


def events_of(stdout: str) -> list[Event]:
    events = [parse_event_line(line) for line in stdout.splitlines()]
    assert all(isinstance(e, Event) for e in events), events
    return events


def test_idle_job_streams_numbered_events_and_writes_result_files(tmp_path):
    proc = agent("run", write_spec(tmp_path, idle_spec(1.0)), "--out", "out", cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == AgentExit.OK, stderr
    events = events_of(stdout)
    kinds = [e.kind for e in events]
    assert kinds[0] == "hello" and kinds[1] == "job_start" and kinds[-1] == "job_end"
    assert kinds.count("memory") >= 4  # 20 Hz for 1 s, plus one at the start (slack for load)
    assert [e.seq for e in events] == list(range(len(events)))
    monos = [e.t_mono_ns for e in events]
    assert monos == sorted(monos)
    hello = events[0].data
    for key in (
        "agent_version",
        "python_version",
        "torch_version",
        "cpu_model",
        "cpu_cores",
        "total_memory_bytes",
        "os",
        "pi_model",
    ):
        assert key in hello
    memory = [e.data for e in events if e.kind == "memory"]
    assert all(m["rss_bytes"] > 0 and m["hwm_bytes"] >= m["rss_bytes"] * 0.5 for m in memory)
    assert (tmp_path / "out" / "events.jsonl").read_text() == stdout
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] == "completed" and result["job_id"] == "idle-test"
    assert "torch" not in stderr


def test_invalid_spec_exits_2_with_an_error_event_naming_the_field(tmp_path):
    spec = idle_spec(1)
    spec["batch_size"] = "big"
    proc = agent("run", write_spec(tmp_path, spec), cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == AgentExit.BAD_SPEC
    error = events_of(stdout)[-1]
    assert error.kind == "error" and error.data["field"] == "batch_size"
    assert "'batch_size'" in stderr and "'big'" in stderr


def test_dataset_checksum_mismatch_is_a_crash_with_an_error_event(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits.npz").write_bytes(b"not the data set")
    spec = {
        "schema_version": 1,
        "job_id": "bad-data",
        "method": {"name": "standard"},
        "model": "mlp",
        "dataset": {"name": "digits", "path": "data/digits.npz", "sha256": "0" * 64},
        "epochs": 1,
    }
    proc = agent("run", write_spec(tmp_path, spec), "--out", "out", cwd=tmp_path)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == AgentExit.CRASHED
    error = events_of(stdout)[-1]
    assert error.kind == "error" and error.data["type"] == "DatasetMismatch"
    assert error.data["oom"] is False and "sha256" in error.data["message"]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "failed"


def _wait_for_kind(proc: subprocess.Popen, kind: str, timeout_s: float = 30) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "agent closed stdout early"
        lines.append(line)
        if json.loads(line)["kind"] == kind:
            return lines
    raise AssertionError(f"no {kind} event in {timeout_s} s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_gives_an_interrupted_record_and_exit_130(tmp_path, signum):
    proc = agent("run", write_spec(tmp_path, idle_spec(60)), "--out", "out", cwd=tmp_path)
    _wait_for_kind(proc, "job_start")
    started = time.monotonic()
    os.killpg(proc.pid, signum)
    rest, _ = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5
    assert proc.returncode == AgentExit.INTERRUPTED
    last = events_of(rest)[-1]
    assert last.kind == "interrupted" and last.data["reason"] == signal.Signals(signum).name
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] == "interrupted"


def test_agent_stops_itself_when_the_host_goes_away(tmp_path):
    proc = agent("run", write_spec(tmp_path, idle_spec(60)), "--out", "out", cwd=tmp_path)
    _wait_for_kind(proc, "job_start")
    proc.stdout.close()  # the host died: the next event cannot be written
    assert proc.wait(timeout=20) == AgentExit.INTERRUPTED
    mirrored = (tmp_path / "out" / "events.jsonl").read_text().splitlines()
    assert json.loads(mirrored[-1])["kind"] == "interrupted"


def test_clock_answers_every_request_until_eof(tmp_path):
    proc = agent("clock", cwd=tmp_path, stdin=subprocess.PIPE)
    before = time.time()
    stdout, _ = proc.communicate("a\nb\nc\n", timeout=30)
    answers = [json.loads(line)["t_wall_s"] for line in stdout.splitlines()]
    assert len(answers) == 3 and answers == sorted(answers)
    assert before - 1 < answers[0] < time.time() + 1
    assert proc.returncode == 0


def test_facts_prints_one_json_object_without_torch(tmp_path):
    proc = agent("facts", cwd=tmp_path)
    stdout, _ = proc.communicate(timeout=30)
    facts = json.loads(stdout)
    assert facts["cpu_cores"] == os.cpu_count()
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, device_agent.cli, device_agent.job, "
            "contract.events; print('torch' in sys.modules)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.strip() == "False"


PMIC_OUTPUT = """\
   3V7_WL_SW_A current(0)=0.10000000A
   3V3_SYS_A current(1)=0.20000000A
   VDD_CORE_A current(7)=2.00000000A
   3V7_WL_SW_V volt(8)=3.70000000V
   3V3_SYS_V volt(9)=3.30000000V
   VDD_CORE_V volt(15)=0.80000000V
   EXT5V_V volt(24)=5.10000000V
   garbage line
"""


def test_pmic_power_is_the_sum_of_volts_times_amps_over_rails_with_both():
    power_w, rails = parse_pmic_adc(PMIC_OUTPUT)
    assert set(rails) == {"3V7_WL_SW", "3V3_SYS", "VDD_CORE"}
    assert power_w == pytest.approx(3.7 * 0.1 + 3.3 * 0.2 + 0.8 * 2.0)
    assert parse_pmic_adc("") == (0.0, {})


def test_a_modeled_source_runs_in_the_agent_from_the_devices_own_load(tmp_path):
    """A remote device's `modeled` power is computed where the load is (issue 15 point 4):
    the host puts the profile into the spec, the agent streams `power` events from its own
    CPU utilisation and frequency; the harness adds it only for remote devices."""
    from harness.runner import agent_power_model

    spec = idle_spec(1.2)
    spec["telemetry"] = {"memory_hz": 5, "power_hz": 10,
                         "power_model": {"profile": "pi4", "idle_w": 2.7, "busy_w": 6.4}}
    proc = agent("run", write_spec(tmp_path, spec), "--out", "out", cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == AgentExit.OK, stderr
    events = events_of(stdout)
    start = next(e for e in events if e.kind == "job_start")
    assert start.data["power_source"] == "modeled"
    power = [e.data for e in events if e.kind == "power"]
    assert len(power) >= 8
    for data in power:
        assert data["source"] == "modeled" and data["modeled"] is True
        assert 2.7 <= data["power_w"] <= 6.4 and 0 <= data["utilisation"] <= 1
        assert data["interval_s"] > 0 and data["profile"] == "pi4"

    class Device:
        name, transport, meter = "pi", "ssh", {"type": "modeled", "profile": "pi4"}

    assert agent_power_model(Device()) == {"profile": "pi4", "idle_w": 2.7, "busy_w": 6.4}
    Device.transport = "local"  # this machine: the host-side model measures it
    assert agent_power_model(Device()) is None


def test_a_job_reports_the_conditions_it_ran_under(tmp_path):
    """Issue 15 point 6: implementation and why, threads, governor and frequency, kernel
    and library versions at job_start; over the job (temperature, throttling) at job_end."""
    from contract.checksum import file_sha256
    from datafiles.canonical import write_canonical
    from datafiles.digits import load_digits

    data = tmp_path / "digits.npz"
    write_canonical(load_digits(), data)
    spec = {
        "schema_version": 1, "job_id": "lowmem-conditions", "method": {"name": "lowmem"},
        "model": "mlp", "batch_size": 50, "epochs": 1, "max_steps": 2,
        "dataset": {"name": "digits", "path": str(data), "sha256": file_sha256(data)},
        "telemetry": {"memory_hz": 5, "tensor_peak_steps": 0},
    }
    proc = agent("run", write_spec(tmp_path, spec), "--out", "out", cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == AgentExit.OK, stderr
    events = events_of(stdout)
    start = next(e for e in events if e.kind == "job_start").data["conditions"]
    assert start["implementation"] in ("fused C++", "reference")
    assert start["implementation_reason"]  # native.status(): which ran, and why
    assert start["torch_threads"] >= 1 and start["kernel"] == os.uname().release
    assert start["versions"]["torch"] and start["versions"]["python"]
    end = events[-1]
    assert end.kind == "job_end"
    over = end.data["conditions"]
    assert over["implementation"] == start["implementation"]
    assert over["throttled"] in (True, False) and "temp_c_max" in over


def test_cooldown_waits_for_the_idle_temperature_or_gives_up(tmp_path):
    """Issue 15 point 5: arms start alike: before a job the agent waits (in its setup) for
    the board to cool to its idle baseline's temperature, at most cool_max_s."""
    from contract.jobspec import JobSpec
    from device_agent.conditions import cool_down

    thermal = tmp_path / "temp"
    thermal.write_text("58000\n")

    def cooling(seconds: float) -> None:  # the board loses 2 degrees a second
        thermal.write_text(str(int(thermal.read_text()) - 2000))

    done = cool_down(50.0, 60.0, thermal=thermal, sleep=cooling)
    assert done == {"to_c": 50.0, "from_c": 58.0, "at_c": 50.0, "waited_s": 4.0,
                    "reached": True}
    thermal.write_text("70000")
    stuck = cool_down(50.0, 3.0, thermal=thermal, sleep=lambda s: None)
    assert stuck["waited_s"] == 3.0 and stuck["reached"] is False
    assert cool_down(50.0, 3.0, thermal=tmp_path / "none")["waited_s"] == 0.0  # no sensor
    spec = idle_spec(1.0)
    spec["telemetry"] = {"cool_to_c": 47.5, "cool_max_s": 30}
    assert JobSpec.from_dict(spec).telemetry.cool_to_c == 47.5
