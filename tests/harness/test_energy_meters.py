"""Energy intervals against the truth: an emulated UM25C on a real pty, read by the real
driver and recorder into a real run store, while the load's power is a known function of
time (so every window's energy is known exactly).

Every `ok` figure's interval must contain the true energy, and be at most 10 % wide for a
window of 8 s or more at the UM meters' real rate (display refreshed twice a second,
polled four times); after the meter dies mid-job no window that it does not cover is
`ok`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from analysis.energy import MeterAccuracy
from analysis.load import load_run
from analysis.run_energy import PhaseWindow, counter_check, figure_for, recorded_gaps
from harness.meters import um
from harness.meters.emulator import UmEmulator
from harness.meters.recorder import Recorder
from harness.meters.um import UmMeter
from harness.store import RunStore

UM25C = MeterAccuracy(**um.ACCURACY["um25c"], timing_s=0.125)  # as describe_meter records
RECORD_S = 26.0
KILL_AT_S = 19.0


def power_at(x: np.ndarray | float) -> np.ndarray | float:
    """The load's power (W), x seconds after the start: slow and faster swings."""
    return 3.0 + 0.8 * np.sin(2 * np.pi * x / 7.0) + 0.4 * np.sin(2 * np.pi * x / 3.1 + 1.0)


def true_energy(a: float, b: float) -> float:
    """The exact integral of `power_at` over [a, b] (seconds after the start)."""

    def antiderivative(x: float) -> float:
        w1, w2 = 2 * math.pi / 7.0, 2 * math.pi / 3.1
        return 3.0 * x - 0.8 * math.cos(w1 * x) / w1 - 0.4 * math.cos(w2 * x + 1.0) / w2

    return antiderivative(b) - antiderivative(a)


class KnownSignal:
    """The emulator draws `power_at` of the host's wall clock since `t0_s`."""

    def __init__(self, t0_s: float) -> None:
        self.t0_s = t0_s

    def power_w(self) -> float:
        return float(power_at(time.time() - self.t0_s))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """26 s of a UM25C at its real rate; the meter dies (its port vanishes) at 19 s."""
    run_dir = tmp_path_factory.mktemp("runs") / "known"
    store = RunStore.create(run_dir).start()
    t0 = time.time()
    emulator = UmEmulator("um25c", KnownSignal(t0), refresh_hz=2.0,
                          link=run_dir.parent / "rfcomm0").start()
    meter = UmMeter("um25c", emulator.path, poll_hz=4.0, refresh_hz=2.0)
    recorder = Recorder(meter, store, "pi").start()
    try:
        time.sleep(KILL_AT_S - (time.time() - t0))
        emulator.stop()  # the meter is gone for good
        time.sleep(RECORD_S - (time.time() - t0))
    finally:
        recorder.stop()
        emulator.stop()
        store.close()
    run = load_run(run_dir)
    (trace,) = run.traces
    gaps = recorded_gaps(run.gaps, "pi", trace.meter, float(trace.t_host_s[-1]))
    return t0, trace.t_host_s, trace.power_w, gaps, run.counters


def figure(recorded, start_s: float, end_s: float):
    t0, t, p, gaps, _ = recorded
    window = PhaseWindow("pi", "job", 1, "job", 0, t0 + start_s, t0 + end_s)
    return figure_for(t, p, window, idle=None, gaps=gaps, accuracy=UM25C, clock=None)


def test_every_ok_interval_contains_the_truth_and_long_jobs_are_within_10_percent(recorded):
    widths = []
    for length in (2.0, 3.0, 5.0, 8.0, 10.0, 12.0):
        for start in np.arange(1.0, KILL_AT_S - 0.5 - length, 0.45):
            f = figure(recorded, start, start + length)
            truth = true_energy(start, start + length)
            if f.status != "ok":
                continue
            assert f.energy_lo_j <= truth <= f.energy_hi_j, (
                f"[{start:.2f}, {start + length:.2f}] s: {f.energy_j:.3f} J "
                f"[{f.energy_lo_j:.3f}, {f.energy_hi_j:.3f}], truth {truth:.3f} J")
            if length >= 8.0:
                widths.append((f.energy_hi_j - f.energy_lo_j) / truth)
    assert len(widths) >= 15  # the long windows were ok and checked, not skipped
    assert max(widths) <= 0.10, max(widths)


def test_the_meters_own_counter_cross_checks_the_integrated_energy(recorded):
    """Issue 15 point 7: the UM's cumulative mWh counter, an independent figure."""
    f = figure(recorded, 1.0, KILL_AT_S - 1.0)
    row = {"device": "pi", "meter": "um25c", "t_start_s": f.t_start_s, "t_end_s": f.t_end_s,
           "energy_j": f.energy_j, "energy_lo_j": f.energy_lo_j, "energy_hi_j": f.energy_hi_j,
           "status": f.status}
    counters = recorded[4]
    assert len(counters) > 20 and counters["counter_wh"].is_monotonic_increasing
    check = counter_check(counters, row)
    truth = true_energy(1.0, KILL_AT_S - 1.0)
    assert check["counter_j"] == pytest.approx(truth, abs=2 * 3.6 + 0.5)  # whole mWh counts
    assert check["counter_mismatch"] is False
    wrong = counter_check(counters, {**row, "energy_j": 2 * f.energy_j})
    assert wrong["counter_mismatch"] is True and wrong["counter_diff_j"] > 0


def test_no_window_the_dead_meter_does_not_cover_is_ok(recorded):
    after = figure(recorded, KILL_AT_S + 1.0, KILL_AT_S + 5.0)
    assert after.status == "withheld" and math.isnan(after.energy_j)
    spanning = figure(recorded, KILL_AT_S - 6.0, KILL_AT_S + 2.0)
    assert spanning.status == "withheld", spanning.reason
    for start in np.arange(KILL_AT_S - 8.0, RECORD_S - 2.0, 0.5):
        f = figure(recorded, start, start + 2.0)
        if start + 2.0 > KILL_AT_S + 0.5:
            assert f.status != "ok", (start, f.reason)
