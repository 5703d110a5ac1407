"""The pty emulators, read by the real drivers through pyserial: protocols and faults."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from harness.errors import HarnessUsageError
from harness.meters.base import MeterDisconnected
from harness.meters.emulator import (
    ConstantSignal,
    FaultPlan,
    LoadSignal,
    TraceSignal,
    UmEmulator,
)
from harness.meters.modeled import POWER_PROFILES
from harness.meters.um import UmMeter


def poll_for(meter: UmMeter, seconds: float) -> list:
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples += meter.read()
    return samples


@pytest.mark.parametrize("model", ["um24c", "um25c", "um34c"])
def test_each_um_model_over_a_pty(model, tmp_path):
    signal = TraceSignal(np.array([0.0, 1.0]), np.array([2.0, 4.0]))  # a ramp, so no repeats
    with UmEmulator(model, signal, refresh_hz=10, link=tmp_path / "rfcomm0") as emulator:
        assert Path(emulator.path).is_symlink()
        assert os.readlink(emulator.path).startswith("/dev/pts/")
        meter = UmMeter(model, emulator.path, poll_hz=10, refresh_hz=10)
        meter.connect()
        samples = poll_for(meter, 1.0)
        meter.close()
    assert len(samples) >= 6
    resolution_a = 0.0001 if model == "um25c" else 0.001
    for sample in samples:
        assert 2.0 <= sample.power_w <= 4.0 + 1e-3
        assert sample.volts == pytest.approx(5.1, abs=0.006)
        assert sample.amps == pytest.approx(sample.power_w / 5.1, abs=resolution_a + 2e-4)
    assert meter.rejected_records == 0


def test_a_steady_load_is_not_mistaken_for_repeats():
    with UmEmulator("um25c", ConstantSignal(3.0), refresh_hz=2) as emulator:
        meter = UmMeter("um25c", emulator.path, poll_hz=8)
        meter.connect()
        samples = poll_for(meter, 2.0)
        meter.close()
    # 8 polls a second of a display that refreshes twice a second: repeats are dropped,
    # yet a steady reading is still reported about twice a second.
    assert meter.duplicates >= 8
    assert 3 <= len(samples) <= 6


def test_bad_checksums_and_torn_records_are_counted_and_skipped():
    faults = FaultPlan(bad_checksum=0.15, torn=0.1, seed=7)
    for model in ("um25c", "um34c"):
        with UmEmulator(model, ConstantSignal(2.0), refresh_hz=20, faults=faults) as emulator:
            meter = UmMeter(model, emulator.path, poll_hz=20, refresh_hz=20)
            meter.connect()
            samples = poll_for(meter, 2.0)
            meter.close()
            injected = emulator.injected["bad_checksum"] + emulator.injected["torn"]
            sent = emulator.records_sent
        assert injected >= 3
        # Every bad record is refused and counted, except that a record torn after its
        # first byte is indistinguishable from noise, and the last answer may be unread.
        assert injected - 2 <= meter.rejected_records <= injected
        assert sent - injected - 1 <= len(samples) + meter.duplicates <= sent - injected


def test_corrupt_bytes_are_skipped_by_resync():
    faults = FaultPlan(corrupt=0.3, seed=11)
    with UmEmulator("um24c", ConstantSignal(2.0), refresh_hz=20, faults=faults) as emulator:
        meter = UmMeter("um24c", emulator.path, poll_hz=20, refresh_hz=20)
        meter.connect()
        samples = poll_for(meter, 1.5)
        meter.close()
        assert emulator.injected["corrupt"] >= 3
        assert len(samples) + meter.duplicates == emulator.records_sent
    assert meter.parser.skipped_bytes > 0


def test_stall_then_recovery():
    faults = FaultPlan(stall_every_s=1.0, stall_s=0.6)
    with UmEmulator("um25c", ConstantSignal(2.0), refresh_hz=10, faults=faults) as emulator:
        meter = UmMeter("um25c", emulator.path, poll_hz=10, refresh_hz=10)
        meter.connect()
        samples = poll_for(meter, 2.5)
        meter.close()
        assert emulator.injected["stall"] >= 2
    gaps = np.diff([s.t_host_s for s in samples])
    assert gaps.max() > 0.5  # the stall shows as a silence
    assert meter.timeouts >= 2
    assert samples[-1].t_host_s > time.time() - 1.0  # and readings resumed


def test_unplug_and_reappear_at_the_same_path(tmp_path):
    link = tmp_path / "meter"
    with UmEmulator("um25c", ConstantSignal(2.0), refresh_hz=10, link=link) as emulator:
        meter = UmMeter("um25c", str(link), poll_hz=10, refresh_hz=10)
        meter.connect()
        assert poll_for(meter, 0.5)
        first_pty = os.readlink(link)
        emulator.unplug(0.6)
        with pytest.raises(MeterDisconnected):
            poll_for(meter, 1.0)
        meter.close()
        time.sleep(0.1)
        with pytest.raises(MeterDisconnected):
            meter.connect()  # still gone
        time.sleep(0.8)
        assert link.is_symlink()
        meter.connect()
        assert poll_for(meter, 0.5)
        meter.close()
        assert emulator.injected["unplug"] == 1
    assert first_pty.startswith("/dev/pts/")


def test_load_signal_follows_a_busy_process_tree():
    # The busy loop is a grandchild: the whole tree counts, not just the root.
    script = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'while True: pass'])"
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        (busy,) = psutil.Process(parent.pid).children()
        profile = POWER_PROFILES["pi4"]
        signal = LoadSignal(profile, pid=parent.pid)
        before, t0 = busy.cpu_times(), time.monotonic()
        time.sleep(1.0)
        power_w = signal.power_w()
        after, t1 = busy.cpu_times(), time.monotonic()
    finally:
        for process in psutil.Process(parent.pid).children(recursive=True):
            process.kill()
        parent.kill()
        parent.wait()
    used_s = (after.user + after.system) - (before.user + before.system)
    utilisation = used_s / (t1 - t0) / (psutil.cpu_count() or 1)
    assert utilisation > 0.1, "the busy loop did not get the CPU"
    assert power_w == pytest.approx(profile.power_w(utilisation), abs=0.1 * profile.busy_w)
    assert power_w > profile.idle_w + 0.1


def test_trace_csv_and_its_errors(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("t_s,power_w\n0,1.0\n10,3.0\n")
    signal = TraceSignal.from_csv(trace)
    assert 1.0 <= signal.power_w() <= 1.1
    bad = tmp_path / "bad.csv"
    bad.write_text("t_s,power_w\n0,1.0\n1,lots\n")
    with pytest.raises(HarnessUsageError, match=r"bad.csv:3: .*power_w"):
        TraceSignal.from_csv(bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("torn=2", "bad value 'torn=2'"),
        ("stall=1:2", "bad value 'stall=1:2'"),
        ("melt=0.1", "unknown fault 'melt'"),
    ],
)
def test_fault_spec_errors(text, message):
    with pytest.raises(HarnessUsageError, match=message):
        FaultPlan.parse(text)


def test_fault_spec_parses():
    plan = FaultPlan.parse("torn=0.05,corrupt=0.02,checksum=0.01,stall=30:2,unplug=20:3,seed=9")
    assert plan == FaultPlan(0.05, 0.02, 0.01, 30.0, 2.0, 20.0, 3.0, 9)
