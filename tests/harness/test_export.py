"""`harness export`: the store's tables plus the tidy energy, jobs and devices tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.jobs import job_table
from analysis.load import load_run
from analysis.run_energy import energy_table
from harness.cli import main
from harness.store.synthetic import build_synthetic_run

ENERGY = ["device", "job", "method", "model", "phase", "epoch", "window", "t_start_s",
          "t_end_s", "duration_s", "energy_j", "energy_lo_j", "energy_hi_j", "above_idle_j",
          "above_idle_lo_j", "above_idle_hi_j", "meter", "meter_kind", "samples", "status",
          "reason"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "syn"
    build_synthetic_run(path, devices=("pi-a", "pi-b"), gap=(1.0, 2.0), seeds=(0,))
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_writes_energy_jobs_and_devices_with_the_documented_columns(run_dir, tmp_path,
                                                                           fmt, capsys):
    out = tmp_path / fmt
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    read = pd.read_csv if fmt == "csv" else pd.read_parquet
    for table in ("energy", "jobs", "devices", "events", "power_samples", "phases", "results"):
        assert str(out / f"{table}.{fmt}") in printed
    energy = read(out / f"energy.{fmt}")
    assert list(energy.columns[: len(ENERGY)]) == ENERGY
    assert set(energy["phase"]) == {"idle", "job", "epoch"}
    assert set(energy["status"]) <= {"ok", "low_confidence", "withheld"}
    assert set(energy["meter_kind"]) == {"measured"}
    ok = energy[energy["status"] == "ok"]
    assert (ok["energy_lo_j"] <= ok["energy_j"]).all()
    assert (ok["energy_j"] <= ok["energy_hi_j"]).all()
    withheld = energy[energy["status"] == "withheld"]  # the gapped epoch, on each device
    assert len(withheld) == 2 and withheld["energy_j"].isna().all()
    assert withheld["reason"].str.contains("cannot be bridged").all()
    epochs = energy[energy["phase"] == "epoch"]
    assert epochs["epoch"].notna().all() and energy["window"].isna().all()
    # the same figures the report's analysis computes
    run = load_run(run_dir)
    same = energy_table(run)
    assert energy["energy_j"].fillna(-1).tolist() == pytest.approx(
        same["energy_j"].fillna(-1).tolist())
    jobs = read(out / f"jobs.{fmt}")
    assert {"device", "job", "method", "model", "status", "implementation"} <= set(jobs.columns)
    assert len(jobs) == len(run.jobs)
    devices = read(out / f"devices.{fmt}")
    assert list(devices.columns[:2]) == ["device", "machine"]
    assert set(devices["machine"]) == {"synthetic"}


def test_headline_leaves_withheld_figures_out_and_counts_them(run_dir):
    run = load_run(run_dir)
    jobs = job_table(run, energy_table(run))
    gapped = jobs[jobs["job_id"] == "mlp-digits-standard-b100-s0-r0@pi-a"].iloc[0]
    assert (gapped["epochs_metered"], gapped["epochs_withheld"]) == (2, 1)
    assert not math.isnan(gapped["energy_per_epoch_j"])
    assert gapped["energy_per_epoch_lo_j"] <= gapped["energy_per_epoch_j"] <= gapped[
        "energy_per_epoch_hi_j"]
