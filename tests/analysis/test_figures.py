"""Figures for papers: one theme and one colour per method everywhere, labels in words with
units, intervals drawn, symmetric-log where above-idle noise crosses zero, SVG and PDF
beside the HTML (from a Jinja2 template), low-confidence figures called that; the report
and its SVGs opened in headless Chromium."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest

from analysis import figures
from analysis.report import analyse, write_report
from analysis.style import method_colours
from harness.store.synthetic import build_synthetic_run

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "paper"
    build_synthetic_run(run_dir, devices=("pi-a", "pi-b"), seeds=(0, 1), gap=(1.0, 2.0))
    return write_report(analyse(run_dir, modeled=False), run_dir / "report")


def svg_text(path: Path) -> str:
    root = ET.parse(path).getroot()  # well-formed SVG
    return " ".join(t.strip() for t in root.itertext() if t.strip())


def test_every_figure_is_written_as_svg_and_pdf_with_words_and_units(report: Path):
    folder = report.parent / "figures"
    stems = sorted({p.stem for p in folder.iterdir()})
    assert len(stems) >= 5
    for stem in stems:
        assert (folder / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert (folder / f"{stem}.png").stat().st_size > 1000
    energy = svg_text(folder / "energy-per-epoch.svg")  # SVG keeps text as text
    assert "energy per epoch (J)" in energy and "energy above idle per epoch (J)" in energy
    assert "95 % intervals" in energy
    trade = svg_text(folder / "trade-offs.svg")
    assert "test accuracy (%)" in trade and "test_accuracy" not in trade
    assert "time per epoch (s)" in svg_text(folder / "time-per-epoch-across-repeats.svg")
    html = report.read_text()
    for stem in stems:
        assert f'href="figures/{stem}.svg"' in html and f'href="figures/{stem}.pdf"' in html


def test_low_confidence_figures_are_called_that_not_missing(report: Path):
    html = report.read_text()
    missing = html.split("<h2>What is missing</h2>")[1].split("<h2>")[0]
    low = html.split("<h2>Low-confidence figures</h2>")[1].split("<h2>")[0]
    assert "low-confidence" not in missing.lower()
    assert "<li>" in low and "gap" in low  # the bridged 1 s gap of the synthetic run
    energy = svg_text(report.parent / "figures" / "energy-per-epoch.svg")
    assert "low-confidence energy" in energy  # the legend names the hollow points


def jobs_frame(above: list[float], status: list[str]) -> pd.DataFrame:
    n = len(above)
    gross = np.linspace(10, 12, n)
    return pd.DataFrame({
        "method": (["standard", "lowmem"] * n)[:n], "device": ["pi-a"] * n,
        "energy_per_epoch_j": gross, "energy_per_epoch_lo_j": gross - 0.5,
        "energy_per_epoch_hi_j": gross + 0.5,
        "energy_above_idle_per_epoch_j": above,
        "energy_above_idle_per_epoch_lo_j": np.array(above) - 0.3,
        "energy_above_idle_per_epoch_hi_j": np.array(above) + 0.3,
        "energy_status": status,
    })


def test_intervals_colours_and_symlog_where_noise_crosses_zero():
    fig = figures.energy_per_epoch(jobs_frame([0.1, -0.05, 0.2, 0.02], ["ok"] * 4))
    gross, above = fig.axes
    assert above.get_yscale() == "symlog" and gross.get_yscale() == "linear"
    colours = method_colours(["standard", "lowmem"])
    drawn = {mcolors.to_hex(line.get_color()) for line in gross.lines}
    assert drawn == {mcolors.to_hex(colours["standard"]), mcolors.to_hex(colours["lowmem"])}
    caps = [c for c in gross.collections]  # one error bar (interval) per job
    assert len(caps) == 4
    assert "symmetric log" in above.get_ylabel()
    # the same method keeps its colour whatever else a run has
    assert method_colours(["lowmem"])["lowmem"] == method_colours(["zz", "lowmem"])["lowmem"]
    plain = figures.energy_per_epoch(jobs_frame([5.0, 6.0, 5.5, 6.2], ["ok"] * 4))
    assert plain.axes[1].get_yscale() == "linear"
    hollow = figures.energy_per_epoch(jobs_frame([5.0, 6.0], ["low_confidence", "ok"]))
    faces = [line.get_markerfacecolor() for line in hollow.axes[0].lines]
    assert "none" in faces


@pytest.mark.chromium
def test_report_and_figures_open_in_headless_chromium(report: Path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(report.as_uri())
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(sizes) >= 5 and all(w > 300 for w in sizes), sizes
        assert page.inner_text("h2 >> nth=1") == "Low-confidence figures"
        page.click("text=SVG >> nth=0")  # the vector figure beside the HTML opens
        page.wait_for_load_state()
        assert page.url.endswith(".svg")
        box = page.eval_on_selector("svg", "s => s.getBoundingClientRect().width")
        assert box > 300
        browser.close()
