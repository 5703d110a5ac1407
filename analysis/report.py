"""Analyse a run end to end and write the self-contained HTML report plus its tables as CSV.

`analyse(path)` is what the report, `harness report` and the notebooks share:
load, energies, per-job table, method comparison, reproduction table, the list of what
the run lacks and the list of its low-confidence figures (shown, and called that). The
HTML comes from a Jinja2 template (`analysis/templates/report.html.j2`); it embeds every
figure as a base64 PNG, so the one file can be mailed or archived (no script, no external
resource), and each figure is also written beside it as SVG and PDF (`figures/`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.figure import Figure

from analysis import figures
from analysis.compare import compare_methods, headline
from analysis.energy import UNKNOWN_ACCURACY, MeterAccuracy
from analysis.jobs import job_table
from analysis.load import Run, load_run
from analysis.reproduction import modeled_table, reproduction_table, run_combos
from analysis.run_energy import devices_without_power, energy_table, meter_infos


@dataclass
class Analysis:
    run: Run
    energy: pd.DataFrame
    jobs: pd.DataFrame
    comparison: pd.DataFrame
    headline: pd.DataFrame
    modeled: pd.DataFrame
    reproduction: pd.DataFrame
    meters: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    low_confidence: list[str] = field(default_factory=list)
    baseline: str = "standard"


def missing_notes(run: Run, jobs: pd.DataFrame, energy: pd.DataFrame) -> list[str]:
    """Everything the run lacks, one line each, for the report's 'missing' section."""
    notes = list(run.missing)
    for device in devices_without_power(run):
        notes.append(f"device {device}: no power samples (no meter or the meter failed); "
                     "its energy is not computed")
    if not run.phases.empty and run.phases[run.phases["kind"] == "idle"].empty:
        notes.append("no idle phase: energy above idle is not computed")
    for r in jobs.itertuples():
        if isinstance(r.missing, str) and "no result" in r.missing:
            notes.append(f"job {r.job_id} on {r.device}: no result (status {r.job_status})")
    for r in energy[energy["status"] == "withheld"].itertuples():
        notes.append(f"withheld energy {r.device}/{r.meter} {r.job} {_where(r)}: {r.reason}")
    return notes


def meter_table(run: Run) -> pd.DataFrame:
    """Each device's meter, its accuracy class and where the class comes from, so that a
    reader sees which energy figures rest on an assumed class rather than a maker's."""
    rows = [{"device": device, "meter": m.name, "type": m.type, "kind": m.kind,
             "class": f"±({m.accuracy.relative * 100:.3g} % + {m.accuracy.offset_w * 1000:.3g} mW)",
             "class_is": _class_is(m.accuracy),
             "source": m.accuracy.source}
            for (device, _), m in sorted(meter_infos(run.info, run.devices).items())]
    return pd.DataFrame(rows, columns=["device", "meter", "type", "kind", "class", "class_is",
                                       "source"])


def _class_is(accuracy: MeterAccuracy) -> str:
    if accuracy is UNKNOWN_ACCURACY:
        return "unknown"
    return "assumed" if accuracy.assumed else "published"


def low_confidence_notes(energy: pd.DataFrame) -> list[str]:
    """The energy figures that are shown but low-confidence, one line each (not 'missing')."""
    return [f"{r.device}/{r.meter} {r.job} {_where(r)}: {r.reason}"
            for r in energy[energy["status"] == "low_confidence"].itertuples()]


def _where(r) -> str:
    if r.phase == "epoch":
        return f"epoch {r.epoch}"
    if r.phase == "window":
        return f"window {r.window}"
    return r.phase


def analyse(path: str | Path, modeled: bool = True, baseline: str = "standard",
            extra_models: Sequence[str] = ()) -> Analysis:
    """Everything the report shows; `modeled=False` skips the engine's memory model,
    `extra_models` adds models the run did not train to the reproduction table."""
    run = load_run(path)
    energy = energy_table(run)
    jobs = job_table(run, energy)
    comparison = compare_methods(jobs, baseline=baseline)
    notes: list[str] = []
    if modeled:
        modeled_frame, notes = modeled_table(run_combos(jobs, extra_models))
    else:
        modeled_frame, _ = modeled_table([])
        notes = ["modeled memory not requested (--no-model)"]
    return Analysis(
        run=run,
        energy=energy,
        jobs=jobs,
        comparison=comparison,
        headline=headline(comparison),
        modeled=modeled_frame,
        reproduction=reproduction_table(jobs, modeled_frame),
        meters=meter_table(run),
        missing=missing_notes(run, jobs, energy) + notes,
        low_confidence=low_confidence_notes(energy),
        baseline=baseline,
    )


def all_figures(a: Analysis) -> dict[str, Figure]:
    """The report's figures by title."""
    out: dict[str, Figure] = {}
    devices = sorted(set(a.run.devices["name"].dropna()) | set(a.jobs["device"].dropna()))
    for device in devices:
        out[f"Power trace — {device}"] = figures.power_trace(a.run, device)
    out["Energy per epoch"] = figures.energy_per_epoch(a.jobs)
    out["Memory: modeled vs measured"] = figures.memory_breakdown(a.jobs, a.modeled)
    out["Trade-offs"] = figures.tradeoffs(a.jobs)
    out["Time per epoch across repeats"] = figures.repeats_box(a.jobs)
    return out


def _table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p class='none'>(none)</p>"
    return frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}",
                         border=0, classes="t")


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def write_report(a: Analysis, out_dir: str | Path) -> Path:
    """Write `report.html`, its figures as PNG/SVG/PDF in `figures/`, and the CSV tables into
    `out_dir`; returns the HTML's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"headline": a.headline, "comparison": a.comparison, "jobs": a.jobs,
              "energy": a.energy, "reproduction": a.reproduction, "modeled_memory": a.modeled,
              "meters": a.meters}
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    drawn = []
    for title, fig in all_figures(a).items():
        paths = figures.save(fig, out / "figures" / _slug(title))
        drawn.append({"title": title,
                      "png": base64.b64encode(paths["png"].read_bytes()).decode("ascii"),
                      "svg": paths["svg"].relative_to(out).as_posix(),
                      "pdf": paths["pdf"].relative_to(out).as_posix()})
    environment = Environment(loader=PackageLoader("analysis", "templates"),
                              autoescape=select_autoescape(["html", "j2"]))
    html = environment.get_template("report.html.j2").render(
        run_id=a.run.run_id, run_path=str(a.run.path), n_jobs=len(a.jobs),
        n_devices=a.run.devices["name"].nunique(), baseline=a.baseline,
        missing=a.missing, low_confidence=a.low_confidence, figures=drawn,
        tables={name: _table(frame) for name, frame in
                (("headline", a.headline), ("reproduction", a.reproduction), ("jobs", a.jobs),
                 ("meters", a.meters))},
        csv_files=[f"{name}.csv" for name in tables],
    )
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
