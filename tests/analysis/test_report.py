"""`harness report` / `harness compare`, the HTML report in headless Chromium, bad input."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from analysis.load import load_run
from analysis.report import analyse, write_report
from harness.cli import main
from harness.store.synthetic import DEFAULT_METHODS, MethodProfile, build_synthetic_run

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def harness(capsys):
    """Run the harness command line in this process (saves an interpreter start per call)."""

    def run(*args: str) -> Result:
        code = main(list(args))
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "syn"
    build_synthetic_run(path, devices=("pi-a", "pi-b"), unmetered=("pi-b",), gap=(1.0, 2.0),
                        without_results=("mlp-digits-lowmem-b100-s2-r0@pi-a",))
    return path


def test_report_command_writes_html_and_csv_and_prints_the_headline(run_dir, tmp_path, harness):
    out = tmp_path / "report"
    proc = harness("report", str(run_dir), "--out", str(out), "--no-model")
    assert proc.returncode == 0, proc.stderr
    assert "lowmem" in proc.stdout and "standard" in proc.stdout
    assert "missing: device pi-b: no power samples" in proc.stdout
    for name in ("headline", "comparison", "jobs", "energy", "reproduction"):
        assert (out / f"{name}.csv").is_file()
    head = pd.read_csv(out / "headline.csv")
    row = head[(head["device"] == "pi-a") & (head["method"] == "standard")].iloc[0]
    # (5 W - 2 W) x 4 s: the epoch with a meter gap is withheld, not averaged in as less
    assert row["J / epoch above idle"].startswith("12 [")
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 6
    assert "no result" in page and "<script" not in page
    meters = pd.read_csv(out / "meters.csv")  # each meter's class and where it comes from
    assert list(zip(meters["device"], meters["class_is"])) == [("pi-a", "published"),
                                                               ("pi-b", "unknown")]
    assert "synthetic: the signal itself, exact" in page


def test_bad_run_path_is_a_one_line_usage_error(tmp_path, harness):
    proc = harness("report", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a run directory" in proc.stderr


def test_store_with_missing_tables_is_analysed_as_far_as_possible(run_dir, tmp_path):
    full = load_run(run_dir)
    broken = tmp_path / "broken"
    broken.mkdir()
    with sqlite3.connect(broken / "run.sqlite") as conn:  # a store holding only three tables
        full.devices.to_sql("devices", conn, index=False)
        full.jobs.to_sql("jobs", conn, index=False)
        full.results.drop(columns=["peak_tensor_bytes"]).to_sql("results", conn, index=False)
    a = analyse(broken, modeled=False)
    text = "\n".join(a.missing)
    for table in ("phases", "power_samples", "memory_samples", "clock_offsets"):
        assert f"table {table} is missing" in text
    assert "results lacks column(s) peak_tensor_bytes" in text
    assert "manifest.json is missing" in text
    assert "device pi-a: no power samples" in text
    lowmem = a.comparison[(a.comparison["device"] == "pi-b") & (a.comparison["method"] == "lowmem")]
    assert lowmem.set_index("metric").loc["test_accuracy", "n"] == 3
    page = write_report(a, tmp_path / "out").read_text()
    assert "table power_samples is missing from the store" in page


def test_compare_two_runs(tmp_path, harness):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    build_synthetic_run(a_dir, seeds=(0, 1))
    slower = {k: MethodProfile(p.power_w, 2 * p.epoch_s, p.rss_delta_bytes, p.tensor_bytes,
                               p.accuracy) for k, p in DEFAULT_METHODS.items()}
    build_synthetic_run(b_dir, seeds=(0, 1), methods=slower)
    out = tmp_path / "cmp.csv"
    proc = harness("compare", str(a_dir), str(b_dir), "--format", "json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    by = {(r["method"], r["metric"]): r for r in rows}
    assert by[("lowmem", "epoch_s")]["value"] == pytest.approx(2.0)
    assert by[("standard", "energy_per_epoch_j")]["value"] == pytest.approx(2.0, rel=1e-3)
    assert by[("standard", "test_accuracy")]["value"] == pytest.approx(0.0, abs=1e-12)
    assert by[("standard", "epoch_s")]["n_a"] == 2
    assert out.is_file()


def test_compare_refuses_ratios_across_devices_or_meters_unless_asked(tmp_path, harness):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    build_synthetic_run(a_dir, devices=("pi-a",), seeds=(0,))
    build_synthetic_run(b_dir, devices=("pi-c",), seeds=(0,), epochs=2)
    refused = harness("compare", str(a_dir), str(b_dir))
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "share no device and meter" in refused.stderr and "--across-devices" in refused.stderr
    assert "devices: ['pi-a'] vs ['pi-c']" in refused.stderr
    across = harness("compare", str(a_dir), str(b_dir), "--across-devices", "--format", "json")
    assert across.returncode == 0, across.stderr
    result = json.loads(across.stdout.strip().splitlines()[-1])
    assert result["across_devices"] and "epochs: [3.0] vs [2.0]" in result["differences"]
    assert {r["note"] for r in result["rows"]} == {"across devices and meters"}
    table = harness("compare", str(a_dir), str(b_dir), "--across-devices")
    assert "differs: devices" in table.stdout and "ACROSS devices and meters" in table.stdout


@pytest.mark.chromium
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
def test_report_opens_in_headless_chromium_without_console_errors(run_dir, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    page_path = write_report(analyse(run_dir, modeled=False), tmp_path / "report")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(page_path.resolve().as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
            reproduction = page.inner_text("table.t >> nth=1")
        finally:
            browser.close()
    assert errors == []
    assert len(widths) >= 6 and all(w > 0 for w in widths)
    assert "measured_rss_delta_factor" in reproduction


def test_reproduction_covers_the_papers_models_beside_the_runs():
    from analysis.reproduction import PAPER_MODELS, run_combos

    jobs = pd.DataFrame({"model": ["mlp"], "batch_size": [50]})
    combos = run_combos(jobs, extra_models=PAPER_MODELS)
    assert ("mlp", "lowmem", 50) in combos and ("mlp", "standard", 100) in combos
    assert {m for m, _, b in combos if b == 100} == set(PAPER_MODELS)
