"""Energy of windows: analytic integrals of piecewise-constant and linear signals; the
interval's terms; gaps bridged or withheld, never silent."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.energy import (
    UNKNOWN_ACCURACY,
    MeterAccuracy,
    Window,
    idle_power,
    window_energy,
)

EXACT = MeterAccuracy(0.0, 0.0, "test: an exact meter")


def energy(t, p, window, **kwargs):
    kwargs.setdefault("accuracy", EXACT)
    return window_energy(t, p, window, **kwargs)


def piecewise(levels_w, breaks_s):
    """P(t) = levels_w[k] on [breaks_s[k], breaks_s[k+1]); returns P and its exact integral."""
    breaks = np.asarray(breaks_s, dtype=float)
    levels = np.asarray(levels_w, dtype=float)

    def power(t):
        index = np.clip(np.searchsorted(breaks, t, side="right") - 1, 0, len(levels) - 1)
        return levels[index]

    def integral(a, b):
        edges = np.clip(breaks, a, b)
        return float(np.sum(levels * np.diff(edges)))

    return power, integral


def test_constant_power_is_exact_with_interpolated_edges():
    t = np.arange(0.0, 100.0, 0.5)
    figure = energy(t, np.full_like(t, 4.2), Window("job", 10.26, 47.91))
    assert figure.energy_j == pytest.approx(4.2 * (47.91 - 10.26), rel=1e-12)
    assert figure.covered_s == pytest.approx(47.91 - 10.26)
    assert figure.samples == 75
    assert figure.achieved_hz == pytest.approx(75 / 37.65)
    assert figure.largest_gap_s == pytest.approx(0.5)
    assert not figure.low_confidence and figure.reason is None


def test_linear_ramp_edges_are_interpolated_exactly():
    t = np.arange(0.0, 20.0, 0.37)
    power = 1.0 + 0.25 * t
    figure = energy(t, power, Window("epoch 1", 3.1, 12.05))
    exact = (1.0 * 12.05 + 0.125 * 12.05**2) - (1.0 * 3.1 + 0.125 * 3.1**2)
    assert figure.energy_j == pytest.approx(exact, rel=1e-12)


def test_steps_recorded_as_two_samples_at_one_instant_are_exact():
    # A meter that reports the level before and after each change at the same instant.
    breaks = [0.0, 7.3, 19.0, 33.3, 60.0]
    levels = [2.1, 6.4, 3.0, 5.5]
    power, integral = piecewise(levels, breaks)
    t = np.sort(np.concatenate([np.arange(0.0, 60.0, 0.5), breaks[1:-1], breaks[1:-1]]))
    p = power(t)
    # at each break the first copy carries the level before, the second the level after
    for brk, before in zip(breaks[1:-1], levels[:-1], strict=True):
        p[np.searchsorted(t, brk)] = before
    figure = energy(t, p, Window("job", 2.2, 55.5))
    assert figure.energy_j == pytest.approx(integral(2.2, 55.5), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    levels=st.lists(st.floats(2.0, 8.0), min_size=1, max_size=6),
    cuts=st.lists(st.floats(0.05, 0.95), min_size=5, max_size=5, unique=True),
    start=st.floats(1.0, 10.0),
    length=st.floats(10.0, 60.0),
    phase=st.floats(0.0, 1e-3),
)
def test_piecewise_constant_at_1000_per_s_matches_the_analytic_integral(
    levels, cuts, start, length, phase
):
    breaks = np.concatenate(
        ([0.0], start + length * np.sort(cuts)[: len(levels) - 1], [start + length + 5])
    )
    power, integral = piecewise(levels, breaks)
    t = np.arange(phase, start + length + 2.0, 1e-3)
    figure = energy(t, power(t), Window("w", start, start + length))
    assert figure.energy_j == pytest.approx(integral(start, start + length), rel=1e-3)
    assert not figure.low_confidence


def test_piecewise_constant_on_a_2_hz_meter_long_window():
    power, integral = piecewise([3.0, 5.0, 2.5], [0.0, 120.0, 400.0, 1000.0])
    t = np.arange(0.13, 900.0, 0.5)
    figure = energy(t, power(t), Window("job", 30.0, 830.0))
    assert figure.energy_j == pytest.approx(integral(30.0, 830.0), rel=1e-3)


def test_idle_baseline_and_energy_above_idle():
    power, _ = piecewise([2.0, 5.0, 2.0], [0.0, 30.0, 90.0, 200.0])
    t = np.arange(0.0, 120.0, 0.1)
    windows = [Window("idle before", 1.0, 29.0), Window("idle after", 91.0, 119.0)]
    idle = idle_power(t, power(t), windows)
    assert idle.power_w == pytest.approx(2.0) and idle.half_width_w == pytest.approx(0.0)
    job = energy(t, power(t), Window("job", 35.0, 85.0), idle=idle)
    assert job.idle_power_w == pytest.approx(2.0)
    assert job.energy_j == pytest.approx(250.0)
    assert job.energy_above_idle_j == pytest.approx(150.0)
    assert job.above_idle_lo_j <= 150.0 <= job.above_idle_hi_j
    assert idle_power(t, power(t), []) is None


def test_the_interval_sums_accuracy_sampling_clock_and_gap_terms():
    t = np.arange(0.0, 30.0, 0.5)
    p = 4.0 + np.where(np.arange(t.size) % 2, 0.5, -0.5)  # alternating 3.5 / 4.5 W
    meter = MeterAccuracy(0.01, 0.02, "test class")
    figure = window_energy(t, p, Window("job", 5.0, 25.0, 0.01, 0.03), accuracy=meter)
    assert figure.accuracy_j == pytest.approx(0.01 * figure.energy_j + 0.02 * 20.0)
    # 40 sample intervals of 0.5 s, each |dp| = 1 W: 1.96 * sqrt(40 * (0.5 * 1)^2 / 12)
    assert figure.sampling_j == pytest.approx(1.959964 * np.sqrt(40 * 0.25 / 12), rel=1e-5)
    assert figure.clock_j == pytest.approx(0.01 * p[10] + 0.03 * p[50])
    assert figure.gap_j == 0.0
    half = figure.accuracy_j + figure.sampling_j + figure.clock_j
    assert (figure.energy_lo_j, figure.energy_hi_j) == pytest.approx(
        (figure.energy_j - half, figure.energy_j + half))
    assert figure.status == "ok" and figure.reason is None


@settings(max_examples=40, deadline=None)
@given(
    start=st.floats(2.0, 20.0),
    length=st.floats(8.0, 40.0),
    period=st.floats(3.0, 20.0),
    seed=st.integers(0, 1000),
)
def test_a_smooth_signal_at_2_hz_with_jittered_stamps_lies_in_a_narrow_interval(
    start, length, period, seed
):
    rng = np.random.default_rng(seed)
    t_true = np.arange(0.0, 80.0, 0.5) + rng.uniform(0, 0.5)
    stamps = t_true + rng.uniform(-0.125, 0.125, t_true.size)  # a UM's poll-phase jitter

    def p(x):
        return 3.0 + 1.0 * np.sin(2 * np.pi * x / period)

    def integral(a, b):
        w = 2 * np.pi / period
        return 3.0 * (b - a) - (np.cos(w * b) - np.cos(w * a)) / w

    figure = energy(stamps, p(t_true), Window("job", start, start + length))
    truth = integral(start, start + length)
    assert figure.status == "ok"
    assert figure.energy_lo_j <= truth <= figure.energy_hi_j
    assert (figure.energy_hi_j - figure.energy_lo_j) / truth < 0.10


def test_a_short_gap_is_bridged_with_a_wider_interval_and_flagged():
    t = np.arange(0.0, 60.0, 0.1)
    keep = (t < 20.0) | (t > 25.0)  # five seconds without samples
    p = np.where(t < 22.5, 3.0, 4.0)[keep]
    figure = energy(t[keep], p, Window("job", 10.0, 40.0))
    hole = t[keep][t[keep] > 20][0] - t[keep][t[keep] < 20][-1]  # 19.9 .. 25.1
    assert figure.largest_gap_s == pytest.approx(hole)
    assert figure.covered_s == pytest.approx(30.0 - hole)
    assert figure.gap_j == pytest.approx(hole * 1.0)  # the observed range, 3 .. 4 W
    assert figure.energy_lo_j <= 3.0 * 12.5 + 4.0 * 17.5 <= figure.energy_hi_j
    assert figure.status == "low_confidence" and "bridged" in figure.reason
    # A short gap that the recorder stored is bridged as well.
    window = Window("job", 10.0, 40.0)
    recorded = energy(t, np.full_like(t, 3.0), window, gaps=[(30.05, 30.25)])
    assert recorded.covered_s == pytest.approx(29.7, abs=1e-6)  # 30.0 .. 30.3 bridged
    assert recorded.energy_j == pytest.approx(90.0) and recorded.low_confidence


def test_a_window_mostly_without_samples_is_withheld_never_zero():
    t = np.arange(0.0, 60.0, 0.1)
    keep = (t < 12.0) | (t > 35.0)
    figure = energy(t[keep], np.full(keep.sum(), 3.0), Window("epoch", 10.0, 40.0))
    assert figure.status == "withheld" and "cannot be bridged" in figure.reason
    assert np.isnan(figure.energy_j) and np.isnan(figure.energy_lo_j)
    assert figure.energy_above_idle_j is None


def test_too_few_samples_for_the_window_is_low_confidence():
    t = np.arange(0.0, 10.0, 0.5)  # a 2 Hz meter
    figure = energy(t, np.full_like(t, 3.0), Window("epoch 3", 4.1, 5.1))
    assert figure.energy_j == pytest.approx(3.0)
    assert figure.samples == 2
    assert figure.low_confidence and "only 2 samples in a 1 s window" in figure.reason


def test_clock_error_that_is_a_large_part_of_the_window_is_low_confidence():
    t = np.arange(0.0, 100.0, 0.01)
    p = np.full_like(t, 3.0)
    ok = energy(t, p, Window("job", 10.0, 60.0, clock_error_s=0.005))
    assert not ok.low_confidence
    bad = energy(t, p, Window("eval", 10.0, 12.0, clock_error_s=0.2))
    assert bad.low_confidence and "clock-offset error ±0.2 s is 10.0 %" in bad.reason


def test_a_window_its_samples_do_not_reach_is_withheld():
    t = np.arange(5.0, 10.0, 0.01)
    late = energy(t, np.full_like(t, 2.0), Window("job", 0.0, 10.0))
    assert late.status == "withheld" and "start 5 s after" in late.reason
    assert late.covered_s == pytest.approx(4.99, abs=1e-6)
    died = energy(t, np.full_like(t, 2.0), Window("job", 6.0, 20.0))
    assert died.status == "withheld" and "no sample after" in died.reason
    empty = energy(np.array([]), np.array([]), Window("job", 0.0, 1.0))
    assert empty.status == "withheld" and np.isnan(empty.energy_j) and empty.samples == 0


def test_an_unknown_meter_class_is_said():
    t = np.arange(0.0, 10.0, 0.1)
    figure = window_energy(t, np.full_like(t, 2.0), Window("job", 1.0, 9.0))
    assert figure.status == "low_confidence" and "accuracy class is unknown" in figure.reason
    assert UNKNOWN_ACCURACY.source.startswith("unknown")


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="window 'x': end 1 is not after start 2"):
        Window("x", 2, 1)
    with pytest.raises(ValueError, match="equal length"):
        window_energy(np.arange(3.0), np.arange(4.0), Window("x", 0, 1))


def test_unsorted_samples_are_sorted():
    t = np.arange(0.0, 10.0, 0.1)
    order = np.random.default_rng(1).permutation(t.size)
    figure = energy(t[order], (1 + t)[order], Window("x", 1.0, 9.0))
    assert figure.energy_j == pytest.approx((9 + 40.5) - (1 + 0.5))
