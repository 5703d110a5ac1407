"""Analyse a run end to end and write the self-contained HTML report plus its tables as CSV.

`analyse(path)` is what the report, `harness report` and the notebooks share:
load, energies, per-job table, method comparison, reproduction table, and the list
of what the run lacks. `write_report` embeds every figure as a base64 PNG, so the
one HTML file can be mailed or archived; no script, no external resource.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import figures
from analysis.compare import compare_methods, headline
from analysis.jobs import job_table
from analysis.load import Run, load_run
from analysis.reproduction import modeled_table, reproduction_table, run_combos
from analysis.run_energy import devices_without_power, energy_table


@dataclass
class Analysis:
    run: Run
    energy: pd.DataFrame
    jobs: pd.DataFrame
    comparison: pd.DataFrame
    headline: pd.DataFrame
    modeled: pd.DataFrame
    reproduction: pd.DataFrame
    missing: list[str] = field(default_factory=list)


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
    for r in energy[energy["status"] != "ok"].itertuples():
        where = f"epoch {r.epoch}" if r.phase == "epoch" else r.phase
        label = "withheld" if r.status == "withheld" else "low-confidence"
        notes.append(f"{label} energy {r.device}/{r.meter} {r.job} {where}: {r.reason}")
    return notes


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
        missing=missing_notes(run, jobs, energy) + notes,
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


def _png(fig: Figure) -> str:
    return base64.b64encode(figures.png(fig)).decode("ascii")


def _table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p class='none'>(none)</p>"
    return frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}",
                         border=0, classes="t")


CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px}table.t{border-collapse:collapse;
font-size:12px}table.t td,table.t th{border:1px solid #ccc;padding:2px 6px}
.missing li{color:#8a3b00}img{max-width:100%}.none{color:#777}"""


def write_report(a: Analysis, out_dir: str | Path) -> Path:
    """Write `report.html` and the CSV tables into `out_dir`; returns the HTML's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"headline": a.headline, "comparison": a.comparison, "jobs": a.jobs,
              "energy": a.energy, "reproduction": a.reproduction, "modeled_memory": a.modeled}
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>Run {html.escape(a.run.run_id)}</title><style>{CSS}</style></head><body>",
             f"<h1>Run {html.escape(a.run.run_id)}</h1>",
             f"<p>{html.escape(str(a.run.path))} — {len(a.jobs)} training job(s) on "
             f"{a.run.devices['name'].nunique()} device(s); means with 95 % t-intervals "
             f"[low, high] over n repeats/seeds; vs baseline <b>standard</b>.</p>",
             "<h2>What is missing</h2>"]
    if a.missing:
        parts.append("<ul class='missing'>" + "".join(
            f"<li>{html.escape(note)}</li>" for note in a.missing) + "</ul>")
    else:
        parts.append("<p class='none'>nothing: every table, result and meter is present</p>")
    parts += ["<h2>Headline</h2>", _table(a.headline),
              "<h2>Reproduction: memory, modeled vs measured</h2>", _table(a.reproduction)]
    for title, fig in all_figures(a).items():
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{_png(fig)}'>")
    parts += ["<h2>Jobs</h2>", _table(a.jobs), "<p>Tables as CSV: "
              + ", ".join(f"{name}.csv" for name in tables) + "</p></body></html>"]
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
