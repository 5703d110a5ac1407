"""The analysis notebooks run top to bottom with papermill (as `harness notebook` runs them)
against a run built by the test; `harness notebook NAME` defaults to runs/latest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from harness.commands.notebook import run_notebook
from harness.service import point_latest
from harness.store.synthetic import build_synthetic_run

NOTEBOOKS = Path(__file__).resolve().parents[2] / "analysis" / "notebooks"
# notebook -> figures it must draw against the run below (two devices, one metered)
EXPECTED_FIGURES = {"overview": 2, "method_comparison": 2, "power_trace": 1, "reproduction": 1}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "nb"
    build_synthetic_run(path, devices=("pi-a", "pi-b"), unmetered=("pi-b",), seeds=(0, 1),
                        gap=(1.0, 2.0))
    return path


def test_every_notebook_is_listed_and_stored_without_outputs():
    names = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == sorted(EXPECTED_FIGURES)
    for name in names:
        book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        assert "parameters" in code[0].metadata.get("tags", []), name
        assert "def " not in "".join(c.source for c in code), f"{name} defines its own logic"


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_notebook_executes_and_draws_its_figures(name, run_dir, tmp_path):
    # the reproduction notebook models only the run's MLP here (each model costs seconds)
    parameters = {"paper_models": ""} if name == "reproduction" else {}
    executed = run_notebook(name, run_dir, tmp_path / "report", parameters)
    assert executed == tmp_path / "report" / f"{name}.ipynb"
    book = nbformat.read(executed, as_version=4)
    injected = [c for c in book.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and str(run_dir.resolve()) in injected[0].source  # papermill set run_dir
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= EXPECTED_FIGURES[name]
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                   for o in outputs)
    if name == "power_trace":
        assert "pi-b" in text  # the device without power is named
    if name == "reproduction":
        assert "modeled_published_factor" in text and "mlp" in text
        assert "unavailable" not in text


def test_harness_notebook_defaults_to_runs_latest(run_dir, tmp_path):
    """`harness notebook NAME` in a folder whose runs/latest `harness run` pointed at a run."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / run_dir.name).symlink_to(run_dir, target_is_directory=True)
    point_latest(runs / run_dir.name, print)
    result = subprocess.run([sys.executable, "-m", "harness", "notebook", "overview"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(NOTEBOOKS.parents[1])})
    assert result.returncode == 0, result.stderr[-2000:]
    executed = Path(result.stdout.strip().splitlines()[-1])
    assert executed == Path("runs/latest/report/overview.ipynb")
    book = nbformat.read(tmp_path / executed, as_version=4)
    assert not [o for c in book.cells if c.cell_type == "code" for o in c.outputs
                if o.output_type == "error"]
    missing = subprocess.run([sys.executable, "-m", "harness", "notebook", "overview"],
                             cwd=tmp_path / "runs", capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(NOTEBOOKS.parents[1])})
    assert missing.returncode == 2
    assert "runs/latest: no run.sqlite (not a run directory) (`harness run` creates it)" in (
        missing.stderr)
