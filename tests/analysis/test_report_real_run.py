"""A real `harness run` (default local inventory and plan) analysed end to end (slow: minutes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from analysis.report import analyse, write_report

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_default_run_is_reported_with_energy_memory_and_the_reproduction_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--out", str(tmp_path), "--run-id", "real"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = analyse(tmp_path / "real", modeled=True)
    assert not [n for n in a.missing if "table" in n or "no result" in n], a.missing
    assert sorted(a.jobs["method"]) == ["lowmem", "standard"]
    assert (a.jobs["result_status"] == "completed").all()
    assert (a.jobs["energy_per_epoch_j"] > 0).all()
    assert a.energy.loc[a.energy["phase"] == "idle", "mean_power_w"].iloc[0] > 0
    epochs = a.energy[a.energy["phase"] == "epoch"]
    assert len(epochs) == 10 and (epochs["samples"] >= 10).all()
    # every figure of the embedded default run is confident (issue 15 point 8)
    assert (a.energy["status"] == "ok").all(), a.energy["reason"].dropna().tolist()
    assert set(a.energy["phase"]) == {"idle", "setup", "job", "epoch"}
    row = a.reproduction.iloc[0]
    assert row["model"] == "mlp" and row["modeled_published_factor"] > 1
    assert row["measured_rss_delta_standard_mib"] > 0
    page = write_report(a, tmp_path / "report").read_text()
    assert page.count("data:image/png;base64,") >= 5
