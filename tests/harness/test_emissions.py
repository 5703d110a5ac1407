"""`harness export` writes a CodeCarbon-compatible emissions.csv (kWh per job, a given carbon
intensity) and the tidy energy table in kWh beside joules, on a run written through the store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.emissions import CODECARBON_COLUMNS, DEFAULT_INTENSITY_G_PER_KWH
from harness.commands.export import export_run
from harness.store.synthetic import build_synthetic_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "carbon"
    build_synthetic_run(path, devices=("pi-a", "pi-b"), unmetered=("pi-b",), seeds=(0, 1))
    return path


def test_emissions_csv_is_codecarbons_format_in_kwh(run_dir: Path, tmp_path: Path):
    written = {p.name: p for p in export_run(run_dir, "csv", tmp_path)}
    emissions = pd.read_csv(written["emissions.csv"])
    energy = pd.read_csv(written["energy.csv"])
    assert tuple(emissions.columns[: len(CODECARBON_COLUMNS)]) == CODECARBON_COLUMNS
    # kWh beside joules in the tidy table
    assert (energy["energy_kwh"] * 3.6e6 - energy["energy_j"]).abs().max() < 1e-6
    assert "above_idle_kwh" in energy and "energy_lo_kwh" in energy
    # one row per job window and meter: the job phase's energy, in kWh
    jobs = energy[energy["phase"].isin(["job", "idle"])]
    assert len(emissions) == len(jobs) > 0
    merged = emissions.merge(jobs, on=["job", "device", "meter"])
    assert ((merged["energy_consumed"] - merged["energy_j"] / 3.6e6).abs() < 1e-12).all()
    assert ((merged["duration"] - merged["duration_s"]).abs() < 1e-9).all()
    # emissions = kWh x the default intensity (documented), kg CO2e
    expected = emissions["energy_consumed"] * DEFAULT_INTENSITY_G_PER_KWH / 1000
    assert ((emissions["emissions"] - expected).abs() < 1e-15).all()
    assert (emissions["carbon_intensity_g_per_kwh"] == DEFAULT_INTENSITY_G_PER_KWH).all()
    assert set(emissions["device"]) == {"pi-a"}  # pi-b has no meter: no row, no zero
    assert (emissions["project_name"] == "carbon").all()
    assert (emissions["energy_lo_kwh"] <= emissions["energy_consumed"]).all()
    assert (emissions["energy_consumed"] <= emissions["energy_hi_kwh"]).all()


def test_cli_carbon_intensity_and_bad_values(run_dir: Path, tmp_path: Path):
    def export(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "harness", "export", str(run_dir),
                               "--format", "csv", "--out", str(tmp_path), *extra],
                              capture_output=True, text=True, cwd=REPO, timeout=300)

    result = export("--carbon-intensity", "100", "--country", "FRA")
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "emissions.csv") in result.stdout
    emissions = pd.read_csv(tmp_path / "emissions.csv")
    assert ((emissions["emissions"] - emissions["energy_consumed"] * 0.1).abs() < 1e-15).all()
    assert (emissions["country_iso_code"] == "FRA").all()
    bad = export("--carbon-intensity", "-5")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: --carbon-intensity: expected gCO2e/kWh between 0 and 100000, got -5.0")
