"""Analysis of synthetic stores whose energy is known analytically (piecewise-constant power)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.compare import compare_methods, t_interval, welch_difference
from analysis.jobs import job_table
from analysis.load import load_run
from analysis.report import missing_notes
from analysis.run_energy import devices_without_power, energy_table
from harness.store.synthetic import DEFAULT_METHODS, build_synthetic_run

GAP = (1.0, 2.0)  # seconds into the first job on each device


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "syn"
    truth = build_synthetic_run(run_dir, devices=("pi-a", "pi-b"), unmetered=("pi-b",), gap=GAP,
                                without_results=("mlp-digits-lowmem-b100-s2-r0@pi-a",))
    run = load_run(run_dir)
    energy = energy_table(run)
    return truth, run, energy, job_table(run, energy)


def _row(energy, job_id, kind, idx):
    index = energy["epoch"] if kind == "epoch" else 0
    sel = energy[(energy["job"] == job_id) & (energy["phase"] == kind) & (index == idx)]
    assert len(sel) == 1, (job_id, kind, idx)
    return sel.iloc[0]


def test_every_window_without_a_gap_matches_the_analytic_energy_to_0_1_percent(synthetic):
    truth, _, energy, _ = synthetic
    first_job = "mlp-digits-standard-b100-s0-r0@pi-a"
    checked = 0
    for t in truth.truth:
        if t.device != "pi-a" or (t.job_id == first_job and t.kind in ("job", "epoch")
                                  and (t.kind == "job" or t.idx == 1)):
            continue
        row = _row(energy, t.job_id, t.kind, t.idx)
        assert row["energy_j"] == pytest.approx(t.energy_j, rel=1e-3)
        assert row["above_idle_j"] == pytest.approx(t.energy_above_idle_j, rel=1e-3, abs=1e-6)
        assert row["duration_s"] == pytest.approx(t.duration_s)
        assert row["status"] == "ok", row["reason"]
        assert row["energy_lo_j"] <= t.energy_j * (1 + 1e-9) and t.energy_j <= row["energy_hi_j"]
        checked += 1
    assert checked == 1 + 5 * 4 + 2  # idle, 5 whole jobs x (job + 3 epochs), 2 epochs of the 1st
    assert _row(energy, "idle-pi-a", "idle", 0)["mean_power_w"] == pytest.approx(2.0, rel=1e-3)


def test_a_meter_gap_is_bridged_or_withheld_never_silent(synthetic):
    _, _, energy, jobs = synthetic
    job_id = "mlp-digits-standard-b100-s0-r0@pi-a"
    epoch = _row(energy, job_id, "epoch", 1)  # 1 s of a 4 s epoch: more than a quarter
    assert epoch["status"] == "withheld" and "cannot be bridged" in epoch["reason"]
    assert math.isnan(epoch["energy_j"])
    whole = _row(energy, job_id, "job", 0)  # 1 s of 12 s: bridged, with a wider interval
    watts = DEFAULT_METHODS["standard"].power_w
    assert whole["status"] == "low_confidence" and "bridged" in whole["reason"]
    assert whole["energy_j"] == pytest.approx(watts * whole["duration_s"], rel=1e-3)
    assert whole["gap_j"] > 0
    job = jobs[jobs["job_id"] == job_id].iloc[0]
    assert job["energy_status"] == "low_confidence" and "cannot be bridged" in job["energy_reason"]
    assert (job["epochs_metered"], job["epochs_withheld"]) == (2, 1)
    assert job["energy_per_epoch_j"] == pytest.approx(watts * 4.0, rel=1e-3)  # the other two


def test_per_epoch_and_per_sample_energy_gross_and_above_idle(synthetic):
    _, _, _, jobs = synthetic
    job = jobs[jobs["job_id"] == "mlp-digits-lowmem-b100-s1-r0@pi-a"].iloc[0]
    prof = DEFAULT_METHODS["lowmem"]
    assert job["energy_per_epoch_j"] == pytest.approx(prof.power_w * prof.epoch_s, rel=1e-3)
    assert job["energy_above_idle_per_epoch_j"] == pytest.approx(
        (prof.power_w - 2.0) * prof.epoch_s, rel=1e-3)
    samples_per_epoch = 10 * 100
    assert job["energy_per_sample_j"] == pytest.approx(
        prof.power_w * prof.epoch_s / samples_per_epoch, rel=1e-3)
    assert job["step_s"] == pytest.approx(prof.epoch_s / 10)


def test_jobs_without_results_and_devices_without_meters_are_named(synthetic):
    _, run, energy, jobs = synthetic
    assert devices_without_power(run) == ["pi-b"]
    no_result = jobs[jobs["job_id"] == "mlp-digits-lowmem-b100-s2-r0@pi-a"].iloc[0]
    assert "no result" in no_result["missing"]
    assert not math.isnan(no_result["energy_per_epoch_j"])  # its energy is still measured
    unmetered = jobs[jobs["device"] == "pi-b"]
    assert unmetered["missing"].str.contains("no energy").all()
    notes = missing_notes(run, jobs, energy)
    assert any("device pi-b: no power samples" in n for n in notes)
    assert any("mlp-digits-lowmem-b100-s2-r0@pi-a" in n and "no result" in n for n in notes)
    assert any("withheld energy" in n and "cannot be bridged" in n for n in notes)


def test_method_comparison_factors_with_t_intervals(synthetic):
    _, _, _, jobs = synthetic
    cmp = compare_methods(jobs)
    b = cmp[(cmp["device"] == "pi-b") & (cmp["method"] == "lowmem")].set_index("metric")
    std, low = DEFAULT_METHODS["standard"], DEFAULT_METHODS["lowmem"]
    assert b.loc["peak_tensor_bytes", "vs_mean"] == pytest.approx(std.tensor_bytes
                                                                  / low.tensor_bytes)
    assert b.loc["peak_tensor_bytes", "vs_how"] == "paired"
    assert b.loc["peak_tensor_bytes", "vs_n"] == 3
    assert b.loc["epoch_s", "vs_mean"] == pytest.approx(low.epoch_s / std.epoch_s)
    assert b.loc["test_accuracy", "vs_mean"] == pytest.approx(low.accuracy - std.accuracy)
    assert "energy_per_epoch_j" not in b.index  # no meter on pi-b: no energy figure
    a = cmp[(cmp["device"] == "pi-a") & (cmp["method"] == "lowmem")].set_index("metric")
    assert a.loc["test_accuracy", "n"] == 2  # one lowmem job has no result
    assert a.loc["test_accuracy", "vs_how"] == "welch"
    assert a.loc["energy_per_epoch_j", "vs_how"] == "ratio of means"
    rss = a.loc["peak_rss_delta_bytes"]
    assert rss["ci_low"] < rss["mean"] < rss["ci_high"]


def test_t_interval_and_welch_match_textbook_values():
    iv = t_interval(np.array([1.0, 2.0, 3.0]))
    assert (iv.mean, iv.n) == (2.0, 3)
    assert iv.high - iv.mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(t_interval(np.array([5.0])).low)
    a, b = np.array([1.0, 2.0, 4.0, 7.0]), np.array([2.0, 2.5, 3.0])
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    w = welch_difference(a, b)
    assert (w.low, w.high) == (pytest.approx(ref.low), pytest.approx(ref.high))


def test_several_metered_devices_each_get_their_own_time_ordered_trace(tmp_path):
    truth = build_synthetic_run(tmp_path / "fleet", devices=("pi-a", "pi-b", "pi-c"),
                                unmetered=("pi-b",), seeds=(0,), seed=3)
    run = load_run(tmp_path / "fleet")
    assert [(t.device, t.meter) for t in run.traces] == [("pi-a", "synthetic"),
                                                        ("pi-c", "synthetic")]
    assert all(np.all(np.diff(t.t_host_s) > 0) for t in run.traces)
    assert sum(t.t_host_s.size for t in run.traces) == truth.samples
    energy = energy_table(run)
    for t in truth.truth:
        if t.device == "pi-b":
            continue
        row = _row(energy, t.job_id, t.kind, t.idx)
        assert row["device"] == t.device
        assert row["energy_j"] == pytest.approx(t.energy_j, rel=1e-3)
