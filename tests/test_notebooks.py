"""The analysis notebooks run top to bottom (nbclient) against a run built by the test."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from analysis.synthetic import build_synthetic_run

NOTEBOOKS = Path(__file__).resolve().parent.parent / "analysis" / "notebooks"
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
def test_notebook_executes_and_draws_its_figures(name, run_dir):
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(book, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(run_dir.parent)}})
    # the reproduction notebook models only the run's MLP here (each model costs seconds)
    client.execute(env={**os.environ, "BNN_RUN_DIR": str(run_dir), "BNN_PAPER_MODELS": ""})
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
